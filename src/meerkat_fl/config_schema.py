"""The settings: one typed dataclass tree, every setting with its default and meaning (split from config.py).

``meerkat_fl.config`` re-exports every name here and holds what works on the tree: TOML load and save, the
dotted ``key=value`` grammar, validation (config_checks.py) and the environment's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    source: str = "smollm2"  # "smollm2" (embedded), "tiny" (tests), a .gguf file, a local dir or a hub id
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bf16 | fp16; trainable values keep a float32 master copy


@dataclass
class TaskConfig:
    name: str = "sst2"
    data_dir: str | None = None  # a folder laid out like shared/data; default: $MEERKAT_DATA_DIR
    train_path: str | None = None  # explicit local file for the training split (CSV/TSV/JSONL)
    test_path: str | None = None  # explicit local file for the evaluation split
    # (paths: .csv/.tsv/.jsonl/.json, optionally .gz, or a `datasets` save_to_disk folder)
    hub: str | None = None  # Hugging Face dataset ("org/name" or "org/name:config") instead of the task's own
    max_length: int = 64  # tokens per example (prompt truncated from the left)
    train_size: int | None = None  # seeded subsample of the training split; None = all
    eval_size: int | None = 500  # seeded subsample of the evaluation split; None = all
    eval_batch_size: int = 32
    # test: evaluate on the task's test split. validation: on a fixed slice held out of the training split
    # (the same for every run seed), for tuning hyper-parameters without touching the test split.
    eval_split: str = "test"
    validation_size: int = 500  # examples held out of the training split when eval_split = "validation"
    # The task's own settings (TASK_OPTIONS; unset = the task's default; a task refuses those it does not take;
    # None, not a default value, so checkpoints written before a key existed still match).
    loss: str | None = None  # classification: verbalizer (default) | options; generation: response
    template: str | None = None  # generation: alpaca (default) | chat (the tokenizer's chat template)
    max_prompt_length: int | None = None  # generation: prompt tokens (cut from the left); default: what is left
    max_response_length: int | None = None  # generation: response tokens incl. EOS; default max_length // 2
    max_new_tokens: int | None = None  # generation: greedy tokens per row at evaluation (ROUGE-L); default 64
    columns: tuple[str, ...] | None = None  # generation: "field=column" for a file's columns, e.g. ["response=output"]
    categories: tuple[str, ...] | None = None  # generation: category names of a local file (partition labels)


# TaskConfig keys that configure the task itself (passed to its `configure` when set).
TASK_OPTIONS = ("loss", "template", "max_prompt_length", "max_response_length", "max_new_tokens", "columns",
                "categories")


@dataclass
class MaskConfig:
    kind: str = "sensitive"  # sensitive | random | magnitude | dense | lora (LoRA adapters: see [lora])
    density: float = 1e-3
    scope: str | None = None  # linear | all; None = linear for sparse kinds, all for dense
    selection: str = "per_tensor"  # per_tensor | global
    path: str | None = None  # an existing mask file; None = build (and cache under the run folder)
    calibration: str | None = None  # text file or folder; None = <data_dir>/calibration/wikitext-2
    calibration_sequences: int = 32
    calibration_seq_len: int = 128
    calibration_batch_size: int = 4
    score: str = "fisher"  # fisher (mean squared grad) | grad_squared (square of mean grad) [choice]
    seed: int = 0  # random mask only


@dataclass
class LoraConfig:
    """LoRA-FedZO (``mask.kind = "lora"``): ZO on LoRA adapters injected with PEFT, not on a mask of base weights.

    The other mask keys are then ignored. A is drawn from ``run.seed`` (every party builds the same adapters),
    B starts at zero.
    """

    rank: int = 8
    alpha: float = 16.0  # scaling alpha / rank
    # Decoder-block linears (or an untied lm_head) to adapt, by module name or dotted suffix (PEFT's
    # target_modules) [choice: q and v, as MeZO's LoRA runs and LoRA-FedZO use]. Llama-style names: q_proj k_proj
    # v_proj o_proj gate_proj ...
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class ZOConfig:
    lr: float = 2e-4
    eps: float = 1e-3
    batch_size: int = 16
    noise_cache: str = "auto"  # auto | on | off: keep a step's noise between its 3 uses (auto: sparse masks)
    noise: str = "gaussian"  # gaussian (the paper's) | rademacher (±1, SPSA's original)
    # torch_cpu (CPU torch.Generator, fast on CPU, what every earlier run drew) | philox (counter-based, drawn
    # on the model's device with the same bits on CPU and CUDA: for GPUs). Part of the run's identity (noise.py).
    noise_generator: str = "torch_cpu"


@dataclass
class FOConfig:
    """The first-order upper bound (``method = "fedavg_fo"``): local backprop steps on the mask's coordinates.

    T, the batch size (``zo.batch_size``) and the downlink are shared with every method; zo.lr and zo.eps do
    not apply to backprop steps.
    """

    optimizer: str = "sgd"  # sgd | adam (torch's, a fresh optimiser each round)
    # [choice] probed, not tuned, on the demo setting (SmolLM2-135M, Meerkat's 1e-3 mask, 3 rounds): sgd 3e-3 ->
    # 0.700 accuracy; sgd 1e-2 -> 0.655 and adam 1e-3 -> 0.660, both with a loss spike in round 3
    lr: float = 3e-3


@dataclass
class LRScheduleConfig:
    """How the lr (zo.lr, fo.lr or FedMeZO's personalised lr) changes over a run (schedule.py): per round in a
    federated run (the plan carries the round's lr, so replay stays exact), per step in `meerkat finetune`.
    [choice] constant by default, as MeZO and the paper; linear and cosine decay towards ``final`` x lr."""

    kind: str = "constant"  # constant | linear | cosine
    final: float = 0.0  # the lr approached at the end, as a fraction of the configured lr, in [0, 1]
    warmup: int = 0  # rounds (federated) or steps (finetune) of linear warm-up before the decay


@dataclass
class TrainConfig:
    """Centralised (single-machine) MeZO-style fine-tuning: `meerkat finetune`."""

    steps: int = 100
    eval_every: int = 50  # steps; 0 = only at the end


@dataclass
class FedConfig:
    strategy: str = "meerkat"  # meerkat | fedmezo | meerkat_vp (server rule; the mask picks sparse/dense)
    num_clients: int = 10
    sample_fraction: float = 1.0  # share of clients sampled per round
    sample_count: int | None = None  # overrides sample_fraction when set
    rounds: int = 20
    local_steps: int = 10  # T
    partition: str = "dirichlet"  # iid | dirichlet | pathological | mixture
    alpha: float = 0.5
    labels_per_client: int = 1
    num_extreme: int = 0  # mixture: single-label clients
    mixture_rest: str = "dirichlet"  # mixture: how the other clients split the rest
    weighting: str = "data_size"  # data_size | uniform (p_k)
    # values (new masked values) | scalars (every client's seed/scalar list) | pool (the seed pool's changed
    # coefficients: at most fedkseed.pool_size numbers; needs a pool); None: the method's default (values, or
    # pool for FedKSeed), set by validate
    downlink: str | None = None
    # How far one accepted reply can move the model (fed/robust.py, README "Hostile clients"): each client's
    # scalars are bounded by clip_factor x the lower median over the round's accepted replies, of the
    # clients' scalar norms ("norm") or of every |scalar| ("scalar"); "none" keeps only the absolute cap.
    clip: str = "norm"
    clip_factor: float = 4.0  # [choice] 2 halved honest SST-2 learning (README, "Hostile clients")
    max_abs_scalar: float = 1e6  # a reply with any |scalar| above this is rejected whole


@dataclass
class FedKSeedConfig:
    """FedKSeed's seed pool (Qin et al., ICML 2024; fed/seedpool.py): works with any strategy and mask."""

    pool_size: int = 0  # K candidate seeds shared by server and clients (the paper: 4096); 0 = fresh seeds
    sampling: str = "uniform"  # uniform | pro (FedKSeed-Pro: softmax of the normalised mean |g| per seed)
    pro_clip: float = 1000.0  # pro: |g| is clipped to this before averaging (the paper's code default)


@dataclass
class FedMeZOConfig:
    signal: str = "model_diff"  # model_diff | last_loss | mean_loss_5 (FedMeZO's heterogeneity index)
    lr_scale: float = 5e-6  # lr_i = lr + lr_scale * phi_i, phi_i in [-1, 1]


@dataclass
class VPConfig:
    """Meerkat-vp (method doc section 4): GradIP calibration, detection thresholds, re-checks."""

    calibration_steps: int = 100
    early_window: tuple[int, int] = (0, 20)
    late_window: tuple[int, int] = (50, 100)
    quiet_factor: float = 0.1
    rho_later: float = 5.0
    rho_quiet: float = 0.5
    recheck_every: int = 20
    control: str = "detect"  # detect | random (random early stopping, same count)
    log_gradip: bool = True  # write gradip.jsonl (any strategy) when the mask stores the pre-training gradient
    gradip_cosine: bool = False  # also log cos(grad f_p, g*z) per step (analysis only)


@dataclass
class RunConfig:
    seed: int = 0
    out: str | None = None  # run folder; None = runs/<method>-<task>-<timestamp>
    eval_every: int = 5  # rounds; 0 = only at the end
    checkpoint_every: int = 5  # rounds
    zero_shot: bool = True  # evaluate before training
    tensorboard: bool = False  # mirror metrics.jsonl into <run folder>/tensorboard/ (the `tensorboard` extra)


@dataclass
class Config:
    # The method (meerkat_fl.methods: `meerkat methods` lists them); None: inferred from fed.strategy, mask.kind
    # and fedkseed.* (configs written before methods were objects). Resolved by ``validate``.
    method: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    fo: FOConfig = field(default_factory=FOConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    fedmezo: FedMeZOConfig = field(default_factory=FedMeZOConfig)
    fedkseed: FedKSeedConfig = field(default_factory=FedKSeedConfig)
    vp: VPConfig = field(default_factory=VPConfig)
    run: RunConfig = field(default_factory=RunConfig)
