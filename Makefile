# Two commands do all the set-up on a fresh Debian 12 machine (as root): `make demo`, `make test`.
.PHONY: install demo test test-unit bench clean

install:
	bash scripts/install.sh

demo: install
	.venv/bin/nodewire demo $(DEMO_ARGS)

# The test command CI runs (see .ci/run).
test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider tests

test-unit: install
	.venv/bin/python -m pytest -q -m "not root" tests

bench: install
	.venv/bin/nodewire bench connect --services 1000,10000,100000

clean:
	.venv/bin/nodewire cleanup || true
	rm -rf .venv
