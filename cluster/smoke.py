"""A Ray job that proves the cluster can run the base model: load it in a Ray task, answer once.

Run through ``ray job submit -- python -m cluster.smoke --model PATH`` (``make demo`` does).
"""

from __future__ import annotations

import argparse
import time

import ray


@ray.remote(num_cpus=1)
def answer(model_path: str, question: str) -> dict:
    """Load the model inside a Ray worker and greedily answer ``question``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_path)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"question": question, "answer": text.strip(), "seconds": round(time.perf_counter() - start, 2),
            "node": ray.get_runtime_context().get_node_id()[:12]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--question", default="In one sentence: what is differential privacy?")
    args = parser.parse_args()
    ray.init()
    result = ray.get(answer.remote(args.model, args.question))
    print(f"[smoke] node {result['node']} answered in {result['seconds']} s")
    print(f"[smoke] Q: {result['question']}\n[smoke] A: {result['answer']}")


if __name__ == "__main__":
    main()
