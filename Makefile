# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo test test-fast test-compat protos lint bench docker-smoke

setup:
	bash scripts/setup.sh

# Start both services on the embedded all-MiniLM-L6-v2, query them through the client, stop them.
demo: setup
	.venv/bin/python scripts/demo.py

# pytest-xdist workers, one per core of the 2-core CI machine (`make test TEST_WORKERS=0` runs in one
# process). Each worker takes whole test files (--dist loadfile), so a file's module-scoped servers start
# once; every test starts its servers on free ports in its own tmp dir (tests/servers.py).
TEST_WORKERS ?= 2

test: setup
	.venv/bin/python scripts/gen_protos.py --check
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The unit tier while developing: no servers, no processes, no soak tests; well under a minute.
test-fast:
	.venv/bin/python -m pytest -q -m "not server and not slow" tests

# The generation, loader and codec tests under the oldest transformers pyproject.toml allows
# (installed once into .compat/, over .venv); `make test` covers the newest. A few minutes.
test-compat: setup
	bash scripts/test_transformers_compat.sh

protos:
	.venv/bin/python scripts/gen_protos.py

lint:
	.venv/bin/ruff check .

# Build both images from the Dockerfiles and run the compose stack as containers (docs/operations.md);
# prints `SKIP docker smoke: ...` and succeeds when no Docker engine can run here.
docker-smoke: setup
	.venv/bin/python scripts/docker_smoke.py
