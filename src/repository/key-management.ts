import { randomBytes } from 'node:crypto';
import { SnapshiftError } from '../core/errors.ts';
import type { Repository } from './repository.ts';
import { makeKeySlot, parseKeySlot } from './repository-keys.ts';

export interface KeyInfo {
  id: string;
  createdAt: string;
  host: string;
  user: string;
  kdf: string;
}

function requireEncrypted(repository: Repository): Buffer {
  if (!repository.keys.dataKey) throw new SnapshiftError('REPO_NOT_ENCRYPTED', `repository ${repository.path} is not encrypted: it has no passwords`);
  return Buffer.concat([repository.keys.dataKey, repository.keys.idKey]);
}

/** Adds a password: a new slot wrapping the same master key. */
export async function addKey(repository: Repository, newPassword: string): Promise<KeyInfo> {
  const master = requireEncrypted(repository);
  const id = randomBytes(8).toString('hex');
  const slot = await makeKeySlot(master, newPassword);
  await repository.backend.put(`keys/${id}.json`, Buffer.from(JSON.stringify(slot, null, 2)));
  return { id, createdAt: slot.createdAt, host: slot.host, user: slot.user, kdf: `scrypt N=${slot.N} r=${slot.r} p=${slot.p}` };
}

export async function listKeys(repository: Repository): Promise<KeyInfo[]> {
  requireEncrypted(repository);
  const result: KeyInfo[] = [];
  for (const entry of await repository.backend.list('keys')) {
    const slot = parseKeySlot((await repository.backend.get(entry.name)).toString('utf8'), entry.name);
    result.push({ id: entry.name.split('/').at(-1)!.replace(/\.json$/, ''), createdAt: slot.createdAt, host: slot.host, user: slot.user, kdf: `scrypt N=${slot.N} r=${slot.r} p=${slot.p}` });
  }
  return result.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** Removes a password's slot; the last one stays (without it the repository could never be opened). */
export async function removeKey(repository: Repository, id: string): Promise<void> {
  const keys = await listKeys(repository);
  const matches = keys.filter((k) => k.id.startsWith(id));
  if (matches.length !== 1) throw new SnapshiftError('REPO_KEY_NOT_FOUND', `${matches.length === 0 ? 'no' : 'more than one'} key slot matches ${id} in repository ${repository.path}`);
  if (keys.length === 1) throw new SnapshiftError('REPO_LAST_KEY', `key ${id} is the repository's last key; add another before removing it`);
  await repository.backend.delete(`keys/${matches[0]!.id}.json`);
}

export interface RepositoryInfo {
  path: string;
  id: string;
  version: number;
  createdAt: string;
  chunkSizeBytes: number;
  compression: string;
  encryption: string;
  packs: number;
  packBytes: number;
  chunks: number;
  indexMemoryBytes: number;
  restorePoints: number;
}

export async function repositoryInfo(repository: Repository): Promise<RepositoryInfo> {
  const packs = await repository.backend.list('data');
  return {
    path: repository.path,
    id: repository.config.id,
    version: repository.config.version,
    createdAt: repository.config.createdAt,
    chunkSizeBytes: repository.config.chunkSizeBytes,
    compression: repository.config.compression,
    encryption: repository.config.encryption,
    packs: packs.length,
    packBytes: packs.reduce((sum, e) => sum + e.sizeBytes, 0),
    chunks: repository.index.size,
    indexMemoryBytes: repository.index.memoryBytes,
    restorePoints: (await repository.restorePointIds()).length,
  };
}
