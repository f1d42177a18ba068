#![no_std]
// This library target exists only so lb-userspace can name lb-ebpf as a build-dependency (cargo then
// rebuilds the agent when the XDP programs change); the programs themselves are in the binary.
