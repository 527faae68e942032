"""Runs vLLM engines for test_vllm.py and bench/bench_vllm.py in a child process (vLLM's engine core is
a process of its own; a child per batch of engines keeps every start clean and its memory freed).

``python vllm_child.py RUNS.json OUT.json``: RUNS is a list of {"folder", "prompts" (lists of token ids),
"max_tokens", "logprobs" (optional int), "engine" (extra LLM kwargs, optional)}; OUT gets, per run,
{"tokens": [...], "logprobs": [[{token: logprob}] per step] per prompt} or {"error": "..."}.
Prompts are token ids: the tiny test folders have no tokenizer (``skip_tokenizer_init``)."""
import gc
import json
import sys


def run_one(run):
    from vllm import LLM, SamplingParams

    engine = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=256, seed=0, **run.get("engine", {}))
    llm = LLM(model=run["folder"], **engine)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True,
                                logprobs=run.get("logprobs"), detokenize=False)
        res = llm.generate([{"prompt_token_ids": p} for p in run["prompts"]], params, use_tqdm=False)
        out = {"tokens": [list(r.outputs[0].token_ids) for r in res]}
        if run.get("logprobs"):
            out["logprobs"] = [[{str(k): v.logprob for k, v in step.items()} for step in r.outputs[0].logprobs]
                               for r in res]
        return out
    finally:
        llm.shutdown() if hasattr(llm, "shutdown") else None
        del llm
        gc.collect()


def main():
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    results = []
    for run in runs:
        try:
            results.append(run_one(run))
        except Exception as e:  # the test reads the message (a refused folder must say why)
            results.append({"error": f"{type(e).__name__}: {e}"})
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
