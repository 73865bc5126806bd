# Recommendation platform: every entry point a user needs. Targets install what they need.
#   make demo    - the platform end to end on the embedded defaults (Milvus Lite, local Triton)
#   make test    - unit, integration (real tritonserver, Milvus Lite and engine, Ray), manifests
#   make serve   - the same stack as the demo, kept up until Ctrl-C

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
TOOLS := var/tools
BUF_VERSION := 1.75.0
BUF := $(TOOLS)/node_modules/.bin/buf
CHECKOV_VERSION := 3.3.30
CHECKOV := $(TOOLS)/checkov/bin/checkov
MILVUS_ENGINE := $(TOOLS)/milvus/.stamp
MLFLOW_VERSION := $(shell sed -nE 's/^mlflow-skinny==([^ ;]+).*/\1/p' requirements.lock)
MLFLOW_UI := $(TOOLS)/mlflow/.stamp
STUBS := services/api/recsys/v1/recommender_pb2.py
CLIENT_STUBS := clients/python/src/recsys_client/_pb/recommender_pb2.py
# The released API every change must stay compatible with (buf breaking); make proto-release
PROTO_BASELINE := proto/releases/recsys-v1.binpb
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help env proto client-proto proto-release lint lint-proto kubectl-installed milvus-engine export train export-events mlflow-ui demo serve test test-unit \
        test-integration test-k8s docker-installed images container-smoke gpu-export gpu-bench-pack gpu-train-pack bench bench-releases bench-events bench-popularity bench-reads bench-limits eval ab-report ab-replay fuzz reliability clean \
        distclean

help:
	@grep -E '^[a-z-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-18s %s\n", $$1, $$2}'

# --- environments -------------------------------------------------------------------------
$(VENV)/.stamp: requirements.lock pyproject.toml clients/python/pyproject.toml
	@echo ">> creating $(VENV) (pinned by requirements.lock; torch 2.13.0 CPU build)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) clients/python/generate_stubs.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e clients/python
	touch $@

# Triton's python backend needs numpy<2 (it returns empty tensors with numpy 2), while
# pyarrow/pandas of the main environment need numpy 2: Triton gets its own environment.
$(TRITON_VENV)/.stamp: requirements-triton.lock
	@echo ">> creating $(TRITON_VENV) (tritonserver from nvidia-pytriton, numpy<2)"
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q -r requirements-triton.lock
	touch $@

$(BUF):
	@echo ">> installing buf $(BUF_VERSION) (npm)"
	mkdir -p $(TOOLS) && cd $(TOOLS) && npm install --silent --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION)

# checkov pins packaging<24 while ray needs >=24.2: it gets a tool environment of its own.
$(CHECKOV):
	@echo ">> installing checkov $(CHECKOV_VERSION) in $(TOOLS)/checkov"
	$(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install -q "checkov==$(CHECKOV_VERSION)"

# The real Milvus engine beside Milvus Lite (RECSYS_MILVUS_SERVER=engine; the engine tests):
# PyPI `milvus` 2.3.5 in a tool environment of its own, so .venv keeps its locked pymilvus.
$(MILVUS_ENGINE): requirements-milvus.lock
	@echo ">> installing the Milvus engine (PyPI milvus, requirements-milvus.lock) in $(TOOLS)/milvus"
	test -x $(TOOLS)/milvus/bin/python || $(PYTHON) -m venv $(TOOLS)/milvus
	$(TOOLS)/milvus/bin/pip install -q --no-deps --require-hashes -r requirements-milvus.lock
	touch $@

milvus-engine: $(MILVUS_ENGINE) ## the real Milvus engine (2.3.5 standalone) for RECSYS_MILVUS_SERVER=engine

kubectl-installed:
	@command -v kubectl >/dev/null || { echo ">> installing kubectl (Debian)"; \
	  (apt-get update -qq && apt-get install -y -qq kubectl) >/dev/null; }

env: $(VENV)/.stamp $(TRITON_VENV)/.stamp $(STUBS) $(CLIENT_STUBS) ## both environments and the gRPC stubs

$(STUBS): proto/recsys/v1/recommender.proto $(VENV)/.stamp
	$(PY) -m grpc_tools.protoc -Iproto --python_out=services/api --grpc_python_out=services/api \
	  --pyi_out=services/api proto/recsys/v1/recommender.proto

# The client package's own stubs (recsys_client._pb), generated before it is installed or
# built, never by hand; its wheel/sdist is built after this (pip wheel clients/python).
$(CLIENT_STUBS): proto/recsys/v1/recommender.proto clients/python/generate_stubs.py | $(VENV)/.stamp
	$(PY) clients/python/generate_stubs.py

client-proto: $(CLIENT_STUBS) ## generate the client package's stubs (clients/python)

proto: $(STUBS) $(CLIENT_STUBS) ## generate Python stubs from proto/ (never edited by hand)

proto-release: $(BUF) ## record the current proto as the released baseline that buf breaking checks
	mkdir -p $(dir $(PROTO_BASELINE))
	$(BUF) build -o $(PROTO_BASELINE)

# --- checks -------------------------------------------------------------------------------
lint-proto: $(BUF) ## buf lint (Google API design rules) and buf breaking against the release
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_BASELINE)

lint: env lint-proto ## ruff, ruff format, mypy, buf lint and the one-way layer contract
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy core services training ops bench clients/python/src/recsys_client tests
	$(VENV)/bin/lint-imports --no-cache

# --- the pipeline -------------------------------------------------------------------------
export: env ## export the pretrained (or --checkpoint) towers into model_repository/
	$(PY) -m training.export $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)

train: env ## fine-tune both models with Ray Train (local: 2 CPU workers; TRAIN_DATA=dir: e.g. an export-events)
	$(PY) -m training.train --config training/configs/local.yaml $(if $(TRAIN_DATA),--set data_dir=$(TRAIN_DATA),)

export-events: env ## the events stream (RECSYS_NATS_URLS) to Parquet in the generic format: var/exports/events
	$(PY) -m ops.export_events --out $(or $(EXPORT_OUT),var/exports/events) $(EXPORT_ARGS)

# The MLflow UI is the full mlflow, which pins pyarrow<26: a tool environment of its own.
$(MLFLOW_UI): requirements-mlflow.lock
	@echo ">> installing mlflow $(MLFLOW_VERSION) (server and UI) in $(TOOLS)/mlflow"
	test -x $(TOOLS)/mlflow/bin/python || $(PYTHON) -m venv $(TOOLS)/mlflow
	$(TOOLS)/mlflow/bin/pip install -q --no-deps -r requirements-mlflow.lock
	touch $@

mlflow-ui: $(MLFLOW_UI) ## the MLflow UI on the tracked training runs (runs/mlruns), http://127.0.0.1:5000
	MLFLOW_ALLOW_FILE_STORE=true $(TOOLS)/mlflow/bin/mlflow ui --port 5000 \
	  --backend-store-uri $(or $(MLRUNS),runs/mlruns)

gpu-export: env ## fp16 ONNX variants (+ TensorRT engines where a GPU and TensorRT exist)
	$(PY) -m training.export.gpu $(if $(ENGINES),--engines,)

demo: env ## end to end: fine-tune (once), export, start Triton + Milvus + gateway, index, recommend, stop
	$(PY) -m ops.demo

serve: env ## the demo stack, serving on RECSYS_GRPC_PORT (50051) until Ctrl-C
	$(PY) -m ops.demo --serve

# --- tests --------------------------------------------------------------------------------
test: lint kubectl-installed $(CHECKOV) $(MILVUS_ENGINE) ## everything: lint, unit, integration, manifests
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=25  # the slowest, to keep the suite in budget

test-unit: env
	$(PY) -m pytest -q -m "not integration" --timeout=300

test-integration: env $(MILVUS_ENGINE)
	$(PY) -m pytest -q -m integration --timeout=900

test-k8s: env kubectl-installed $(CHECKOV)
	$(PY) -m pytest -q tests/k8s

# dockerd (Debian's docker.io; started by ops/docker_engine.py unless DOCKER_HOST answers,
# stopped by its PID) and debootstrap (docker/base.sh, where the upstream base can't be pulled).
docker-installed:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { \
	  echo ">> installing docker.io and debootstrap (Debian)"; \
	  (apt-get update -qq && apt-get install -y -qq docker.io debootstrap) >/dev/null; }

images: env docker-installed ## gateway (+ profile worker), training and MLflow images -> var/images/report.json
	$(PY) -m ops.images $(if $(IMAGES),--only $(IMAGES),) $(if $(TRITON),--triton,)  # TRITON=1: NVIDIA's registry needed

container-smoke: env docker-installed kubectl-installed ## the gateway image run as its pod (read-only root, UID, mounts) -> SERVING + Recommend
	$(PY) -m ops.container_smoke

eval: env ## evaluation: baselines, the offline pipeline and the served gateway -> reports/eval
	$(PY) -m ops.served_eval --data $(or $(DATA),third_party/movielens/ml-latest-small) \
	  $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),$(if $(wildcard runs/local/final/user_tower),--checkpoint runs/local/final,)) \
	  $(if $(MAX_USERS),--max-users $(MAX_USERS),) --out reports/eval

ab-report: env ## per-arm CTR, lift, 95% CI, p-value from the exposures stream (AB_LOG=file: a JSONL log)
	$(PY) -m services.experiments.report $(if $(AB_LOG),--log $(AB_LOG),)

ab-replay: env ## simulated A/B traffic from held-out interactions, then the report
	$(PY) -m ops.ab_replay --data third_party/movielens/ml-latest-small \
	  --log var/experiments/replay.jsonl
	$(PY) -m services.experiments.report --log var/experiments/replay.jsonl

gpu-bench-pack: env ## bundle (fp16 ranker + real pairs) for `python -m bench.gpu run` on a GPU machine
	$(PY) -m bench.gpu pack --out var/gpu-bundle

gpu-train-pack: env ## bundles (the sequence stage; the two towers with BERT in fp16; pydantic wheels) for `python -m bench.gpu_train run` on a GPU machine, and their epochs timed here
	$(PY) -m bench.gpu_train pack --out var/gpu-train-bundle
	$(PY) -m bench.gpu_train pack --stage retrieval --out var/gpu-train-bundle-retrieval

bench: env $(MILVUS_ENGINE) ## benchmarks on their own stack (the Milvus engine), side by side -> BENCHMARKS.md, reports/bench.json
	test -d var/bench/pydeps/nvidia || $(PY) -m pip install -q --target var/bench/pydeps \
	  nvidia-cuda-runtime-cu12  # only for perf_analyzer's libcudart; nothing runs on a GPU
	$(PY) -m bench --out BENCHMARKS.md --json reports/bench.json

bench-releases: env $(MILVUS_ENGINE) ## Recommend as each release make train chooses between serves it, side by side -> reports/bench_release_cost_engine.json
	$(PY) -m bench.pipelines --compare releases $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)

bench-popularity: env $(MILVUS_ENGINE) ## the gateway's popularity refresh at 100,000 items: every row, every item's popularity (pages of 4,096 and 16,384), a first refresh above a counted floor, a later one above the last top's floor -> reports/bench_popularity_refresh.json
	$(PY) -m bench.popularity $(BENCH_POPULARITY_ARGS)

bench-reads: env $(MILVUS_ENGINE) ## the store's reads in id order (ListItems pages, the first items without popularity) and scans of 10,000 rows at 100,000 items: plain queries against the query iterator -> reports/bench_reads.json
	$(PY) -m bench.reads $(BENCH_READS_ARGS)

bench-limits: env ## a client's rate limit per gateway process against one shared through NATS: a check's cost, what 2 processes and a real 2-process gateway admit -> reports/bench_rate_limit.json
	$(PY) -m bench.rate_limit $(BENCH_LIMITS_ARGS)

bench-events: env ## event log through 3 gateways: acknowledged ingest/s, apply lag at 1,000 ev/s (1, 2 workers)
	$(PY) -m bench.event_log --out var/bench/event_log.md $(BENCH_EVENTS_ARGS)

fuzz: env ## >= 10,000 generated requests against the real gateway, plus the file loaders -> answers by code
	rm -f var/fuzz/report.jsonl
	RECSYS_FUZZ_EXAMPLES=10500 RECSYS_RELIABILITY_REPORT=$(CURDIR)/var/fuzz/report.jsonl \
	  $(PY) -m pytest -q -p no:cacheprovider -m fuzz --timeout=1800
	$(PY) -m ops.reliability_report var/fuzz/report.jsonl

reliability: env ## fault scenarios (kills, restarts), then the report table
	rm -f var/reliability/report.jsonl
	RECSYS_RELIABILITY_REPORT=$(CURDIR)/var/reliability/report.jsonl $(PY) -m pytest -q \
	  -p no:cacheprovider -m integration tests/services/reliability tests/services/events \
	  tests/services/gateway/test_fuzz_requests.py tests/services/gateway/test_faults_under_load.py \
	  --timeout=1800
	$(PY) -m ops.reliability_report var/reliability/report.jsonl

clean:
	rm -rf var/demo var/serve var/test .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) $(TRITON_VENV) var services/api/recsys model_repository/*/[0-9]*
	rm -f clients/python/src/recsys_client/_pb/recommender_pb2*
