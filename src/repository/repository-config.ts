import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { SnapshiftError } from '../core/errors.ts';

/** The plaintext `config` file (docs/FORMAT.md § config). */
export interface RepositoryConfig {
  format: 'snapshift-repository';
  version: number;
  id: string;
  createdAt: string;
  chunkSizeBytes: number;
  compression: string;
  encryption: 'aes-256-gcm' | 'none';
  packTargetBytes: number;
  idKey?: string;
}

export const formatVersion = 1;
export const minChunkSizeBytes = 256 * 1024;
export const maxChunkSizeBytes = 8 * 1024 * 1024;
export const defaultChunkSizeBytes = 1024 * 1024;
export const defaultPackTargetBytes = 32 * 1024 * 1024;
/** Packs stay far below 4 GiB, so u32 offsets always fit (docs/FORMAT.md § config). */
export const maxPackTargetBytes = 1024 * 1024 * 1024;

export type Compression = { kind: 'none' } | { kind: 'zstd'; level: number };

/** Parses `none`, `zstd` or `zstd:N` (N = 1..19); `zstd` alone is level 1. */
export function parseCompression(text: string): Compression {
  if (text === 'none') return { kind: 'none' };
  const match = /^zstd(?::(\d+))?$/.exec(text);
  const level = match ? Number(match[1] ?? '1') : NaN;
  if (!match || !(level >= 1 && level <= 19)) {
    throw new SnapshiftError('BAD_ARGUMENT', `unknown compression "${text}" (use none, zstd or zstd:N with N from 1 to 19)`);
  }
  return { kind: 'zstd', level };
}

/** The config's spelling of a compression: `none` or `zstd:N` (`repo init --compression zstd` writes `zstd:1`). */
export function formatCompression(compression: Compression): string {
  return compression.kind === 'none' ? 'none' : `zstd:${compression.level}`;
}

export function checkChunkSize(chunkSizeBytes: number): void {
  const powerOfTwo = Number.isInteger(chunkSizeBytes) && (chunkSizeBytes & (chunkSizeBytes - 1)) === 0;
  if (!powerOfTwo || chunkSizeBytes < minChunkSizeBytes || chunkSizeBytes > maxChunkSizeBytes) {
    throw new SnapshiftError('BAD_ARGUMENT', `chunk size ${chunkSizeBytes} is not a power of two from 256 KiB to 8 MiB`);
  }
}

export function packTargetIsValid(packTargetBytes: number): boolean {
  return Number.isSafeInteger(packTargetBytes) && packTargetBytes >= 1 && packTargetBytes <= maxPackTargetBytes;
}

/** Validates a config read from disk; refuses newer formats instead of guessing. */
export function parseConfig(text: string, location: string): RepositoryConfig {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new SnapshiftError('REPO_CONFIG_DAMAGED', `${location}/config is not valid JSON: this is not a snapshift repository, or its config is damaged`);
  }
  const config = value as Partial<RepositoryConfig>;
  if (config.format !== 'snapshift-repository') throw new SnapshiftError('REPO_NOT_A_REPOSITORY', `${location} is not a snapshift repository (config has no snapshift format marker)`);
  if (typeof config.version !== 'number' || config.version > formatVersion) {
    throw new SnapshiftError('REPO_VERSION_UNSUPPORTED', `repository ${location} has format version ${String(config.version)}; this snapshift reads version ${formatVersion} only (upgrade snapshift)`);
  }
  if (typeof config.chunkSizeBytes !== 'number' || typeof config.compression !== 'string' || (config.encryption !== 'aes-256-gcm' && config.encryption !== 'none') || typeof config.packTargetBytes !== 'number') {
    throw new SnapshiftError('REPO_CONFIG_DAMAGED', `${location}/config is damaged (missing or wrong fields)`);
  }
  if (config.encryption === 'none' && (typeof config.idKey !== 'string' || config.idKey.length !== 64)) {
    throw new SnapshiftError('REPO_CONFIG_DAMAGED', `${location}/config is damaged (unencrypted repository without its id key)`);
  }
  if (!packTargetIsValid(config.packTargetBytes)) {
    throw new SnapshiftError('REPO_CONFIG_DAMAGED', `${location}/config is damaged (packTargetBytes ${config.packTargetBytes} is not a whole number from 1 to ${maxPackTargetBytes})`);
  }
  checkChunkSize(config.chunkSizeBytes);
  parseCompression(config.compression);
  return config as RepositoryConfig;
}

/**
 * Whether the repository at `repositoryPath` needs a password, read from its config before opening it (so a
 * password is asked for only when needed): 'missing' when there is no readable config (opening says why).
 */
export async function repositoryEncryption(repositoryPath: string): Promise<'none' | 'encrypted' | 'missing'> {
  const text = await readFile(resolve(repositoryPath, 'config'), 'utf8').catch(() => undefined);
  if (text === undefined) return 'missing';
  try {
    return (JSON.parse(text) as { encryption?: unknown }).encryption === 'none' ? 'none' : 'encrypted';
  } catch {
    return 'encrypted'; // a damaged config: opening the repository reports it
  }
}
