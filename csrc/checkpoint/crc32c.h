// CRC-32C (Castagnoli), the checksum of every checkpoint chunk.
//
// Two implementations with identical results: the SSE4.2 crc32 instruction
// (picked at run time when the CPU has it) and a portable slicing-by-8 table.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ichiban {

// crc of data[0:n), continuing from a previous crc (0 to start).
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// The portable path, exposed so tests can compare both on the same bytes.
uint32_t crc32c_software(const void* data, size_t n, uint32_t crc = 0);

// Whether crc32c() uses the hardware instruction on this CPU.
bool crc32c_hardware_available();

}  // namespace ichiban
