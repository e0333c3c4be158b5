# slurm.mk — vmpool's Slurm hooks; included by the top Makefile.
#
#   make install-slurm-hooks [SLURM_HOOKS_DIR=/usr/local/lib/vmpool/slurm] [SLURM_CONF_DIR=/etc/slurm]
#       [SLURM_PARTITION=vmpool] [SLURM_NODES="vmgw ..."] [NOT_DEFAULT=1] [FORCE=1]
#       [VMPOOL=...] [VMPOOL_CONFIG=...] [JOB_DIR=...] [SLURM_CLASSES=...] [HOOKS_SETTINGS=...]
#     SLURM_CLASSES: the VM classes the submit filter checks (default: `vmpool capacity`'s);
#     NOT_DEFAULT=1: the pool's partition is not the default one (--not-default); FORCE=1: replace
#     a site's own job_submit.lua, keeping a backup (--force).
#   make slurm-deps    - the Debian packages the Slurm tests need (slurmctld slurmd slurm-client munge)
#
# install-slurm-hooks prints the slurm.conf lines that match what it installed.

SLURM_MK_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
SLURM_HOOKS_DIR ?= /usr/local/lib/vmpool/slurm
SLURM_CONF_DIR ?= /etc/slurm
SLURM_PARTITION ?= vmpool
SLURM_NODES ?=
NOT_DEFAULT ?=
FORCE ?=
VMPOOL ?= $(firstword $(wildcard $(CURDIR)/.venv/bin/vmpool) /usr/local/bin/vmpool)
VMPOOL_CONFIG ?= /etc/vmpool/vmpool.conf
JOB_DIR ?= /var/spool/vmpool/jobs
HOOKS_SETTINGS ?=
SLURM_CLASSES ?=
SLURM_PACKAGES = slurmctld slurmd slurm-client munge

.PHONY: install-slurm-hooks slurm-deps lint-slurm-hooks
install-slurm-hooks:
	$(SLURM_MK_DIR)/install --dir '$(SLURM_HOOKS_DIR)' --lua '$(SLURM_CONF_DIR)/job_submit.lua' \
	    --partition '$(SLURM_PARTITION)' $(foreach node,$(SLURM_NODES),--node '$(node)') \
	    $(if $(NOT_DEFAULT),--not-default) $(if $(FORCE),--force) --vmpool '$(VMPOOL)' \
	    --vmpool-config '$(VMPOOL_CONFIG)' --job-dir '$(JOB_DIR)' $(if $(SLURM_CLASSES),--classes '$(SLURM_CLASSES)') $(foreach setting,$(HOOKS_SETTINGS),--set '$(setting)')

slurm-deps:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
	  && command -v munged >/dev/null || { \
	  echo "installing $(SLURM_PACKAGES) (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) >/dev/null; }

lint-slurm-hooks: venv
	$(SHELLCHECK) -x -S warning $(addprefix $(SLURM_MK_DIR)/,prolog epilog jobstarter install slurm-hooks.sh)

# `make lint` and `make test` cover the Slurm hooks too.
lint: lint-slurm-hooks
test: slurm-deps
