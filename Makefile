# Two commands do all set-up on a machine with only Python >= 3.11 and make:
#   make run    install, then run the whole pipeline on config.yaml
#   make test   install, then run the test suite
UV_VERSION := 0.13.9
UV := .tools/bin/uv
CORES ?= 2
SNAKEMAKE := $(UV) run --frozen snakemake --cores $(CORES) --workflow-profile workflow/profiles/default
export UV_LINK_MODE := copy
# Compile the environment's bytecode once at install: every job is a fresh interpreter, and
# where bytecode is not written back (PYTHONDONTWRITEBYTECODE, read-only installs) each one
# would otherwise compile torch's and transformers' sources again on import.
export UV_COMPILE_BYTECODE := 1

.PHONY: install run test test-cluster lint report verify clean

$(UV):
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

.venv/installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	touch $@

install: .venv/installed

run: install
	$(SNAKEMAKE)
	$(MAKE) --no-print-directory results/report.html

# The HTML report, rendered again only when the tables it shows have changed, and only from
# tables that read in full (a damaged one is named with its repair; Snakemake goes by dates).
results/report.html: results/tables/metrics.parquet results/tables/summary.parquet
	$(UV) run --frozen python -m pipeline verify --tables
	$(SNAKEMAKE) --report $@

report: install
	$(SNAKEMAKE) report
	$(MAKE) --no-print-directory results/report.html

test: install
	$(UV) run --frozen pytest -n 2 --dist loadfile

verify: install
	$(UV) run --frozen python -m pipeline verify

# A real single-node SLURM on this machine (as root; installs Debian's slurm-wlm and munge
# if missing), the scaled-down paper workflow locally and through workflow/profiles/slurm,
# checks, and the cluster stopped again whatever happens. .ci/run calls it after `make test`.
test-cluster: install
	trap 'workflow/scripts/slurm-cluster.sh stop' EXIT INT TERM; \
	workflow/scripts/slurm-cluster.sh start && \
	POSTALIGN_CLUSTER_TEST=1 $(UV) run --frozen pytest tests/cluster -p no:cacheprovider -v -s

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen snakemake --lint

clean:
	rm -rf results .snakemake
