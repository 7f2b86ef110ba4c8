# Two commands do all the set-up on a fresh Debian 12 machine (as root): `make demo`, `make test`.
.PHONY: install demo test test-unit test-image image fuzz bench clean

install:
	bash scripts/install.sh all

demo:
	bash scripts/install.sh demo
	.venv/bin/nodewire demo $(DEMO_ARGS)

# The test command CI runs (see .ci/run). The image test is not in it (building takes minutes): make test-image.
test:
	bash scripts/install.sh test
	.venv/bin/python -m pytest -q -p no:cacheprovider tests

test-unit:
	bash scripts/install.sh test
	.venv/bin/python -m pytest -q -m "not root" tests

# The agent image (deploy/Containerfile) with buildah on a debootstrap base; prints its size.
image:
	bash scripts/install.sh image
	bash scripts/build-image.sh

test-image: image
	NODEWIRE_IMAGE_TEST=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_image.py

# The fuzzed decoders with many more examples than `make test` runs (a few minutes).
fuzz:
	bash scripts/install.sh test
	.venv/bin/python -m pytest -q -p no:cacheprovider --hypothesis-profile=long --hypothesis-show-statistics tests/test_fuzz_*.py

bench: install
	.venv/bin/nodewire bench connect --services 1000,10000,100000

clean:
	.venv/bin/nodewire cleanup || true
	rm -rf .venv
