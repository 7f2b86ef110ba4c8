# Two commands do all the set-up on a fresh Debian 12 machine (as root): `make demo`, `make test`.
.PHONY: install demo test test-unit fuzz bench clean

install:
	bash scripts/install.sh

demo: install
	.venv/bin/nodewire demo $(DEMO_ARGS)

# The test command CI runs (see .ci/run).
test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider tests

test-unit: install
	.venv/bin/python -m pytest -q -m "not root" tests

# The fuzzed decoders with many more examples than `make test` runs (a few minutes).
fuzz: install
	.venv/bin/python -m pytest -q -p no:cacheprovider --hypothesis-profile=long --hypothesis-show-statistics tests/test_fuzz_*.py

bench: install
	.venv/bin/nodewire bench connect --services 1000,10000,100000

clean:
	.venv/bin/nodewire cleanup || true
	rm -rf .venv
