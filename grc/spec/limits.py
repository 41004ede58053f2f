"""The bounds a spec's sizes must keep, and why each is where it is.

Every bound is published in the JSON schema (``grc schema``: ``minimum``/``maximum``), so an editor
flags an absurd value before grc sees it. Each leaves the shipped specs (specs/*.yaml: at most
d_model 768, 15 layers, max_seq_len 4,096, 21M item rows) and the MTGR paper's largest model far
inside, and stops values that can only hang or crash a build: what cannot fit *this* machine is a
separate question, answered before a build starts (grc.build.budget).
"""

from __future__ import annotations

# Bytes of one spec file. The shipped specs are 1-2 KiB; 256 KiB leaves them 100x room while a file
# at the bound still parses in well under a second (PyYAML composes ~200 KiB/s in pure Python).
MAX_SPEC_BYTES = 256 << 10
# Nesting of YAML collections. A spec is at most 5 levels deep (engine.profiles[0].tokens.max);
# the bound stops a deeply nested file before a recursive YAML composer overflows the stack.
MAX_YAML_DEPTH = 32
# Values after expanding YAML aliases. A spec has about a hundred; an alias bomb ("billion laughs")
# is a few lines that expand to billions, so the expansion is counted and stopped here.
MAX_YAML_VALUES = 20_000
# Files in one extends chain: the shipped specs use 2; a chain is resolved recursively.
MAX_EXTENDS = 16
# Problems printed for one spec; a file of junk keys would otherwise print one line per key.
MAX_PROBLEMS = 30

# Widths (d_model, embedding and table dims, attention/linear dims, head_hidden, cross features):
# the widest published transformer hidden size is 16,384; MTGR's widest is 768.
MAX_WIDTH = 16_384
# Layers: MTGR-large has 15, the deepest published transformers ~130.
MAX_LAYERS = 256
MAX_HEADS = 256
# Tokens per user. The padded graph that ONNX Runtime and the engines run holds an [N, N] score
# matrix per user and head: at 65,536 that is 16 GiB in float32, past any GPU for one user. MTGR's
# long history is 1,000 events, mtgr-base's max_seq_len 4,096.
MAX_SEQ_LEN = 65_536
# Time buckets: bucket = min(floor(log2(1 + |dt|)), NB - 1) is computed against the powers of two
# 2**1 .. 2**(NB-1) in int64, so NB - 1 must stay below 63 (and |dt| < 2**63 never reaches more).
MAX_TIME_BUCKETS = 63
# Rows of one embedding table: production id spaces are billions; 2**36 (~69 billion) rows of 16
# bfloat16 values are 2 TiB.
MAX_VOCAB = 1 << 36
# Row blocks over all tables: each block is one tensor in a safetensors header and one manifest
# entry, so the weights stage's bookkeeping grows with it; raise weights.table_block_rows instead.
MAX_TABLE_BLOCKS = 65_536
# Tables, tasks and the names in each token group: the shipped specs have 6, 4 and 3.
MAX_TABLES = 256
MAX_TASKS = 64
# Users in one request or batch: with MAX_SEQ_LEN tokens each, a batch stays below 2**28 tokens, so
# offsets and token counts never approach int32 in the kernels and engines.
MAX_USERS = 4_096
# Engine and verify shape lists, engine targets, bundle instances.
MAX_LIST = 64
MAX_INSTANCES = 64
# Sizes in MiB (weights shards, engine workspace): 1 TiB, more than any disk or GPU holds at once.
MAX_MIB = 1 << 20
# ONNX's protobuf cannot exceed 2 GiB, so initializers must go to external data by then.
MAX_ONNX_INLINE_MIB = 2_048
# Seeds: torch.Generator.manual_seed and numpy take any non-negative int64.
MAX_SEED = (1 << 63) - 1
# Names that become folders, files, tensor and model names: one safe path component, no "..",
# "/", spaces or control characters, at most 64 characters.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
# Table and task names become tensor names (tables.<name>.<block>, history_<name>, scores columns)
# in safetensors, ONNX and Triton configs: identifiers, so dots and dashes cannot split them.
IDENTIFIER_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
# Floats the engines carry: alpha scales q.k inside fp16 engines (largest value 65,504), rank
# weights multiply float32 scores; both far below any overflow at these bounds.
MAX_ALPHA = 1_000.0
MAX_RANK_WEIGHT = 1e6
# CUDA device ordinals on one host, threads per onnxruntime session.
MAX_GPU_ID = 1_023
MAX_THREADS = 1_024
# The dynamic batcher may hold a request at most 10 s: longer is a timeout, not batching.
MAX_QUEUE_DELAY_US = 10_000_000
# Triton version folders are int64; int32's range keeps them valid in every client.
MAX_VERSION = (1 << 31) - 1
# Tokens of one vLLM prompt: a few tokens per field of each event, so 2**24 covers MAX_SEQ_LEN events.
MAX_PROMPT_TOKENS = 1 << 24
