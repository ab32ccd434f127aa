import { SnapshiftError } from '../core/errors.ts';

const unitBytes: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/**
 * Parses a size a person types ("2G", "600M", "256MiB", "4096") into bytes. Units are binary (K = 1024),
 * as with qemu-img and truncate, so "--size 2G" here makes the same disk as "qemu-img create … 2G".
 */
export function parseByteSize(text: string, what = 'size'): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
  if (!match) throw new SnapshiftError('BAD_ARGUMENT', `${what} "${text}" is not a size (examples: 256M, 2G, 4GiB)`);
  const bytes = Math.round(Number(match[1]) * unitBytes[match[2]!.toUpperCase()]!);
  if (!Number.isSafeInteger(bytes)) throw new SnapshiftError('BAD_ARGUMENT', `${what} "${text}" is too large`);
  return bytes;
}

/** "2.0 GiB", "600 MiB": for messages and status output. */
export function formatByteSize(bytes: number): string {
  for (const [unit, size] of [['TiB', 1024 ** 4], ['GiB', 1024 ** 3], ['MiB', 1024 ** 2], ['KiB', 1024]] as const) {
    if (bytes >= size) return `${(bytes / size).toFixed(bytes % size === 0 ? 0 : 1)} ${unit}`;
  }
  return `${bytes} B`;
}
