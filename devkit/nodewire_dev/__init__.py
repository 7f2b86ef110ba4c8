"""nodewire's development kit: the sandbox (netns pods), the Kubernetes API server double, the mock
verbs stack, the benchmarks and the demo. Not part of the shipped agent: the agent never imports it."""
