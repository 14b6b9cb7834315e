# Sourced by setup-llama-cpp.sh and setup-llama-server.sh: the C/C++ flags both llama.cpp
# builds add to their native (-march=native) flags.
#
# No AMX: on the Xeon VMs CI runs on, the CPU reports AMX and the kernel grants its tile
# state, yet ggml's AMX product dies in `ldtilecfg` (SIGSEGV/SIGILL in llama-server and
# llama-batched-bench, every model; seen 2026-12-02 with llama-cpp-python 0.3.36's
# llama.cpp). GCC keeps an explicit -mno-* over -march=native whatever the order. Each
# script keys its cached build by these flags, so changing them rebuilds.
llama_cpp_extra_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
