/* The xxh3-128 kernel for the baseline instruction set (SSE2 on x86-64, NEON on arm64): runs everywhere. */
#define RP_ISA base
#include "kernel.h"
