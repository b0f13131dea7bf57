"""Tinker API training throughput: N clients training at once vs one client doing the same steps,
and vs the same steps in-process (no HTTP, no SDK).

One server (`lorakit serve --tinker` in this process, on 127.0.0.1) on the demo model, fp32, CPU.
Every side trains N adapters (rank 8) for --steps optimizer steps each, every step one
forward_backward of --rows rows of --tokens tokens and one AdamW step:

* one client: a single SDK TrainingClient per adapter, driven one after another (N x steps requests
  in sequence: nothing arrives together, every step runs alone);
* N clients: N SDK clients (one thread each) stepping at the same time, so their forward_backward
  requests arrive together and run as mixed-adapter steps;
* in-process: the same steps through ``training.tokenwise.forward_backward`` with all N adapters'
  rows in one call, and each adapter's ``AdapterOptimizer`` (the floor: what the server adds is
  HTTP, protobuf, futures and scheduling).

Reported: median [min..max] over --repeats of trained tokens per second; ratios of the medians.

    python benchmarks/tinker_clients.py [--clients 4] [--steps 4] [--rows 4] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import tinker
    from tinker import types

    from lorakit.models import load_model, load_tokenizer, write_demo_model
    from lorakit.serve import LoraServer, ServerConfig, serve_in_thread
    from lorakit.serve.tinker import TinkerConfig, TinkerService
    from lorakit.training.tokenwise import AdamStep, AdapterOptimizer, LossRequest, TokenDatum, forward_backward

    root = Path(tempfile.mkdtemp())
    demo = write_demo_model(root / "demo")
    model, tokenizer = load_model(str(demo)).eval(), load_tokenizer(str(demo))
    base = "Qwen/Qwen3-8B-Base"
    server = LoraServer(model, tokenizer, ServerConfig(base_name=base, context_length=1024))
    server.tinker = TinkerService(server, TinkerConfig(tinker_dir=root / "checkpoints"))
    _, url = serve_in_thread(server)
    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randint(0, 256, (args.tokens + 1,), generator=gen).tolist() for _ in range(args.rows)]
               for _ in range(args.clients)]
    datums = [[types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                           loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * args.tokens}) for ids in b]
              for b in batches]
    adam = types.AdamParams(learning_rate=1e-4)
    tokens = args.clients * args.steps * args.rows * args.tokens

    def train(client, k):
        futures = []
        for _ in range(args.steps):
            futures += [client.forward_backward(datums[k], "cross_entropy"), client.optim_step(adam)]
        for f in futures:
            f.result()

    def one_client() -> float:
        clients = [service.create_lora_training_client(base_model=base, rank=8).result() for _ in range(args.clients)]
        start = time.perf_counter()
        for k, client in enumerate(clients):
            train(client, k)
        return tokens / (time.perf_counter() - start)

    def many_clients() -> float:
        clients = [service.create_lora_training_client(base_model=base, rank=8).result() for _ in range(args.clients)]
        threads = [threading.Thread(target=train, args=(c, k)) for k, c in enumerate(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return tokens / (time.perf_counter() - start)

    def in_process() -> float:
        clients = [service.create_lora_training_client(base_model=base, rank=8).result() for _ in range(args.clients)]
        names = [c.model_id for c in clients]
        optimizers = [AdapterOptimizer(model, n) for n in names]
        requests = [LossRequest(n, [TokenDatum(ids[:-1], {"target_tokens": torch.tensor(ids[1:]),
                                                          "weights": torch.ones(args.tokens)}) for ids in b],
                                "cross_entropy") for n, b in zip(names, batches)]

        def loop() -> None:
            for _ in range(args.steps):
                forward_backward(model, requests, 0)
                for opt in optimizers:
                    opt.step(AdamStep(learning_rate=1e-4))
        start = time.perf_counter()
        server.scheduler.exclusive(loop)
        return tokens / (time.perf_counter() - start)

    sides = {"one client": one_client, f"{args.clients} clients": many_clients, "in-process": in_process}
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            results[name].append(fn())
    print(f"{args.clients} adapters x {args.steps} steps x {args.rows} rows x {args.tokens} tokens, demo model, "
          f"fp32 CPU, {args.threads} torch thread(s), {args.repeats} repeats; largest step "
          f"{server.tinker.trainer.largest_step} requests")
    for name, values in results.items():
        print(f"  {name:>12}: {statistics.median(values):8.0f} tokens/s  [{min(values):.0f}..{max(values):.0f}]")
    one, many = statistics.median(results["one client"]), statistics.median(results[f"{args.clients} clients"])
    floor = statistics.median(results["in-process"])
    print(f"  {args.clients} clients / one client: {many / one:.2f}x;  {args.clients} clients / in-process: "
          f"{many / floor:.2f}x")


if __name__ == "__main__":
    main()
