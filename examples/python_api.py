"""mlx-softprompt from Python, end to end, in a notebook's worth of code.

    python examples/python_api.py [WORKDIR]

Runs on the demo world that ships in examples/world/ (a tiny base and guard, CPU, about a
minute), with small budgets; put your own base, guard and prompts in the first cell for
real work. docs/PYTHON_API.md explains each call. The test suite runs this file.
"""

import sys
from pathlib import Path

from mlx_softprompt import data, evaluate, generate, teach, train
from mlx_softprompt.system import open_system

HERE = Path(__file__).resolve().parent
WORK = Path(sys.argv[1] if len(sys.argv) > 1 else "python-api-out")

# 1. the inputs: a base, a guard (spec + weights) and labelled prompts
BASE = str(HERE / "world" / "base")  # any MLX model directory or hub id
GUARD, GUARD_WEIGHTS = str(HERE / "world" / "guard-spec.json"), str(HERE / "world" / "guard")  # or "llama-guard-3-1b", "guard-dir"
prompts = evaluate.load_eval_examples("benign,borderline,harmful", split="train", limit=6)
data.write_jsonl(WORK / "prompts.jsonl", prompts)  # what `mlx-softprompt data export` writes

# 2. teach: the dual system's verdicts and the base's own samples, cached (resumable)
summary = teach.teach(teach.TeachConfig(base=BASE, guard=GUARD, guard_model=GUARD_WEIGHTS,
                                        data=str(WORK / "prompts.jsonl"), out=str(WORK / "teacher"),
                                        max_tokens=16, top_k=16))
print(teach.format_summary(summary, WORK / "teacher"))

# 3. train a soft prompt from arguments (the same names as the CLI flags and config keys)
args = train.make_args(None, base=BASE, teacher=str(WORK / "teacher"), out=str(WORK / "safe.safetensors"),
                       objective="tv", num_tokens=8, iters=10, steps_per_report=5, val_split=0.0,
                       init="text:I'm sorry, but I can't help with that.")
result = train.train(args, log=print)
print(f"trained {result['steps']} steps, loss {result['train_loss']:.4f}")

# 4. open the system (base + soft prompt, P's key/value cache computed once) and complete
system = open_system(BASE, WORK / "safe.safetensors")
ids = generate.chat_ids(system.tokenizer, "How do I bake bread?")
answer = generate.complete(system.model, system.tokenizer, ids, system.cache, generate.GenerationConfig(max_tokens=24))
print(f"answer: {answer.text!r} ({len(answer.tokens)} tokens, {answer.finish_reason})")

# 5. evaluate it against the base and the dual system on held-out prompts
report = evaluate.run(evaluate.EvalArgs(model=BASE, prompt_files=[str(WORK / "safe.safetensors")], guard=GUARD,
                                        guard_model=GUARD_WEIGHTS, suite="benign,borderline,harmful", limit=4,
                                        out=str(WORK / "report.json")),
                      evaluate.EvalConfig(max_tokens=16, timing_prompts=2))
print(evaluate.summary_table(report))
