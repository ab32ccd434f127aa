import { createRequire } from 'node:module';

/** zstd-napi's low-level binding: compress into a reused buffer instead of allocating per chunk. */
export const zstdBinding = createRequire(import.meta.url)('zstd-napi/binding.js') as typeof import('zstd-napi/binding.js');
