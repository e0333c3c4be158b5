# The local OpenStack test bed (tests/cloud/README.md). Included by the top Makefile, which defines
# PY, VENV and the venv / system-deps targets.
#   make cloud-venv   - the cloud venv (.cloud-venv: nova, keystone, placement), pinned by constraints.txt
#   make cloud-up     - start a bed in $(CLOUD_RUN) (daemonized) and print a vmpool config for it
#   make cloud-down   - stop it (nova, keystone, proxy and every VM)
CLOUD_VENV ?= .cloud-venv
CLOUD_RUN ?= run/cloud
# e.g. CLOUD_ARGS="--token-expiration 120 --spawn-delay 2"
CLOUD_ARGS ?=

.PHONY: cloud-venv cloud-up cloud-down

cloud-venv: $(CLOUD_VENV)/.installed
$(CLOUD_VENV)/.installed: tests/cloud/constraints.txt
	$(PY) -m venv $(CLOUD_VENV)
	$(CLOUD_VENV)/bin/pip install -q -r tests/cloud/constraints.txt
	OS_NOVA_DISABLE_EVENTLET_PATCHING=1 $(CLOUD_VENV)/bin/python -W ignore -c \
	  "import nova.tests.functional.integrated_helpers, keystone.server.wsgi, placement.deploy"
	touch $@

cloud-up: venv cloud-venv system-deps
	$(VENV)/bin/python tests/cloud/bed.py up $(CLOUD_RUN) $(CLOUD_ARGS)

cloud-down:
	$(VENV)/bin/python tests/cloud/bed.py down $(CLOUD_RUN)
