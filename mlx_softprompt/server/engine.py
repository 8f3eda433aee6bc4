"""Continuous batching with the system's prefix cache in front of every request.

One thread owns mlx-lm's ``BatchGenerator``: requests join the running batch
as they arrive and leave it when they finish or their client goes away. Each
request starts from its own copy of ``System.cache`` (P's keys/values for a
soft prompt, prefix tuning's prefixes, an empty cache otherwise), so the
prefix is in front of every sequence and no request can see another's.

Sampling is per request: greedy requests share one batched argmax; a sampled
request draws from its own key sequence (``seed``, or a random one), so a
seeded answer does not depend on what else is in the batch.

Models that cannot be batched are served one request at a time by the same
loop: caches without ``merge`` (a quantized KV cache), and architectures whose
batched forward fails or disagrees with the single one (checked once at start
on two prompts of different lengths: mlx-lm's Gemma 2, for one, cannot take a
padded batch).
"""

import copy
import queue
import secrets
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx

from .api import ApiError

TOP_LOGPROBS_MAX = 20


@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences decoded together
    prefill_batch: int = 8  # prompts prefilled together
    max_pending: int = 64  # running + waiting requests; more get 503


@dataclass
class Job:
    """One request's work. The engine writes events; the HTTP thread reads them."""

    ids: List[int]
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's and k alternatives
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)  # set after the last event


@dataclass
class Token:
    id: int
    finish_reason: Optional[str]  # "stop" (end of sequence token: not part of the answer), "length"
    logprob: Optional[float] = None
    top: Optional[List[tuple]] = None  # [(token id, logprob)], best first


def make_sampler(temp: float, top_p: float, seed: Optional[int], max_tokens: int):
    """None for greedy (the batch's shared argmax); else a sampler with its own keys.

    The keys are split from the request's seed up front, one per generated
    token, so step t always uses key t whatever else runs in the batch.
    """
    if temp == 0:
        return None
    from mlx_lm.sample_utils import apply_top_p

    seed = secrets.randbits(32) if seed is None else seed
    keys = mx.random.split(mx.random.key(seed), max(max_tokens, 2))
    step = [0]

    def sample(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        key = keys[min(step[0], keys.shape[0] - 1)]
        step[0] += 1
        return mx.random.categorical(logprobs * (1.0 / temp), key=key)

    return sample


def _logprob_info(job: Job, token: int, logprobs: mx.array):
    if job.logprobs is None:
        return None, None
    chosen = logprobs[token].item()
    top = []
    if job.logprobs > 0:
        k = min(job.logprobs, logprobs.shape[-1])
        idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
        vals = logprobs[idx]
        order = mx.argsort(-vals)
        top = list(zip(idx[order].tolist(), vals[order].tolist()))
    return chosen, top


class Engine:
    """The generation thread. ``submit`` is called from HTTP threads."""

    def __init__(self, system, cfg: Optional[EngineConfig] = None):
        self.system = system
        self.cfg = cfg or EngineConfig()
        self.batchable = all(hasattr(c, "merge") for c in system.cache) if system.cache else True
        self.eos = sorted(set(getattr(system.tokenizer, "eos_token_ids", None) or [system.tokenizer.eos_token_id]))
        self.inbox: "queue.Queue" = queue.Queue()
        self._count = 0  # running + waiting
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # arrays made on this thread must be computed before another thread uses them: the weights, the
        # cache, and whatever a bound method computes lazily (a steering vector times alpha): one forward does it
        mx.eval([c.state for c in system.cache], system.model.parameters(), getattr(system, "params", None) or {})
        mx.eval(system.model(mx.array([[0]]), cache=copy.deepcopy(system.cache)))
        self.thread = threading.Thread(target=self._run, name="mlx-softprompt-generate", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ HTTP side

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._count >= self.cfg.max_pending:
                raise ApiError(503, f"the server is busy ({self._count} requests running or waiting); retry later",
                               kind="server_error", code="server_busy", headers={"Retry-After": "1"})
            self._count += 1
        self.inbox.put(job)
        return job

    def busy(self) -> int:
        return self._count

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout)

    # ------------------------------------------------------------ the thread

    def _finish(self, job: Job, error: Optional[BaseException] = None) -> None:
        if error is not None:
            job.events.put(error)
        job.events.put(None)
        job.done.set()
        with self._lock:
            self._count -= 1

    def _batching_works(self) -> bool:
        """Greedy tokens of two prompts of different lengths, batched and one by one: equal and no error."""
        from mlx_lm.generate import stream_generate

        s = self.system
        prompts = [s.tokenizer.encode("Hi."), s.tokenizer.encode("A longer prompt, so that the batch is padded.")]
        try:
            alone = [[r.token for r in stream_generate(s.model, s.tokenizer, mx.array(p), max_tokens=3,
                                                        prompt_cache=copy.deepcopy(s.cache))] for p in prompts]
            gen = self._new_generator()
            uids = gen.insert(prompts, max_tokens=[3, 3], caches=[copy.deepcopy(s.cache) for _ in prompts])
            together = {u: [] for u in uids}
            for _ in range(20):
                for r in gen.next()[1]:
                    together[r.uid].append(r.token)
            gen.close()
        except Exception:
            return False
        # the single path stops at an end token without repeating it; compare what both produced
        return all(a[:len(b)] == b[:len(a)] and a for a, b in zip(alone, (together[u] for u in uids)))

    def _run(self) -> None:
        try:
            self.batchable = self.batchable and self._batching_works()
            if self.batchable:
                self._run_batched()
            else:
                self._run_single()
        except BaseException:  # never leave a client waiting forever
            traceback.print_exc(file=sys.stderr)
            self._stop.set()
            while True:
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._finish(job, RuntimeError("the generation thread stopped"))
        finally:
            try:  # no work of this thread's streams left in flight when it ends
                mx.synchronize()
            except Exception:
                pass

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(self.system.model, stop_tokens=[[e] for e in self.eos],
                              completion_batch_size=self.cfg.max_batch, prefill_batch_size=self.cfg.prefill_batch,
                              stream=mx.default_stream(mx.default_device()))

    def _take(self, block: bool) -> List[Job]:
        jobs = []
        try:
            job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if job is None:
                    return jobs
                jobs.append(job)
                job = self.inbox.get_nowait()
        except queue.Empty:
            return jobs

    def _run_batched(self) -> None:
        gen = self._new_generator()
        active = {}  # uid -> Job
        while not self._stop.is_set():
            for job in self._take(block=not active):
                if job.cancelled.is_set():
                    self._finish(job)
                    continue
                sampler = make_sampler(job.temp, job.top_p, job.seed, job.max_tokens)
                try:
                    (uid,) = gen.insert([job.ids], max_tokens=[job.max_tokens],
                                        caches=[copy.deepcopy(self.system.cache)], samplers=[sampler])
                except Exception as e:
                    self._finish(job, e)
                    continue
                active[uid] = job
            gone = [uid for uid, job in active.items() if job.cancelled.is_set()]
            if gone:
                gen.remove(gone)
                for uid in gone:
                    self._finish(active.pop(uid))
            if not active:
                continue
            try:
                _, responses = gen.next()
            except Exception as e:  # a failed step fails its batch, not the server
                traceback.print_exc(file=sys.stderr)
                for job in active.values():
                    self._finish(job, e)
                active.clear()
                gen.close()
                gen = self._new_generator()
                continue
            for r in responses:
                job = active.get(r.uid)
                if job is None:
                    continue
                lp, top = _logprob_info(job, r.token, r.logprobs)
                job.events.put(Token(r.token, r.finish_reason, lp, top))
                if r.finish_reason is not None:
                    self._finish(active.pop(r.uid))
        for job in active.values():
            self._finish(job, RuntimeError("the server is shutting down"))
        gen.close()

    def _run_single(self) -> None:
        from mlx_lm.generate import stream_generate

        s = self.system
        while not self._stop.is_set():
            for job in self._take(block=True):
                if job.cancelled.is_set():
                    self._finish(job)
                    continue
                sampler = make_sampler(job.temp, job.top_p, job.seed, job.max_tokens)
                try:
                    for r in stream_generate(s.model, s.tokenizer, mx.array(job.ids), max_tokens=job.max_tokens,
                                             sampler=sampler, prompt_cache=copy.deepcopy(s.cache)):
                        finish = r.finish_reason
                        if finish is None and r.token in self.eos:
                            finish = "stop"
                        lp, top = _logprob_info(job, r.token, r.logprobs)
                        job.events.put(Token(r.token, finish, lp, top))
                        if finish is not None or job.cancelled.is_set():
                            break
                except Exception as e:
                    traceback.print_exc(file=sys.stderr)
                    self._finish(job, e)
                    continue
                self._finish(job)
