// The device checksum devmem uses to verify read-only and durable backups.
//
// Compiled to PTX once, by hand, and committed as checksum.ptx next to this file, so building
// devmem needs no nvcc and running it needs no CUDA runtime (the driver JIT-compiles the PTX):
//
//   nvcc -ptx -arch=compute_75 -o checksum.ptx checksum.cu
//
// then the PTX's `.version` line is lowered to 7.0 (nothing newer is used), so drivers back to
// CUDA 11.0 load it. src/backend/checksum.rs has the same function for the host; the two must
// agree bit for bit (a test on the GPU compares them).
//
// checksum = sum over 8-byte words w[i] of mix(w[i] + i * GOLDEN), modulo 2^64, where mix is
// SplitMix64's finaliser. Each block writes one partial sum; the host adds the partials.

#define GOLDEN 0x9E3779B97F4A7C15ull

__device__ __forceinline__ unsigned long long mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern "C" __global__ void devmem_checksum(const unsigned long long* __restrict__ words,
                                           unsigned long long count,
                                           unsigned long long* __restrict__ partials) {
    __shared__ unsigned long long sums[256];
    unsigned long long sum = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < count; i += stride) {
        sum += mix(words[i] + i * GOLDEN);
    }
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            sums[threadIdx.x] += sums[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = sums[0];
    }
}
