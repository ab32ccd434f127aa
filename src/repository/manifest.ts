import { SnapshiftError } from '../core/errors.ts';
import type { RepositoryKeys } from './repository-keys.ts';
import { SealedType, seal, unseal } from './sealed-file.ts';
import type { StorageBackend } from './backend/storage-backend.ts';

export interface RestorePointDisk {
  name: string;
  sizeBytes: number;
  storedChunks: number;
  zeroChunks: number;
}

export interface RestorePointSummary {
  id: string;
  vmName: string;
  createdAt: string;
  disks: RestorePointDisk[];
  baseId?: string;
  extra: Record<string, unknown>;
}

/** The manifest header: the summary plus what is needed to read the maps. */
export interface ManifestHeader extends RestorePointSummary {
  chunkSizeBytes: number;
}

const magic = Buffer.from('SNMF');
export const zeroId = Buffer.alloc(32);

export function manifestPath(id: string): string {
  return `manifests/${id}`;
}

export function chunkCountOf(sizeBytes: number, chunkSizeBytes: number): number {
  return Math.ceil(sizeBytes / chunkSizeBytes);
}

/** Encodes a manifest (docs/FORMAT.md § Manifests); `maps` holds one 32-byte id per chunk per disk. */
export function encodeManifest(keys: RepositoryKeys, header: ManifestHeader, maps: readonly Buffer[]): Buffer[] {
  const sealedHeader = seal(keys, SealedType.manifestHeader, Buffer.from(JSON.stringify(header)));
  const sealedMaps = seal(keys, SealedType.manifestMaps, Buffer.concat(maps as Buffer[]), true);
  const prefix = Buffer.alloc(12);
  magic.copy(prefix, 0);
  prefix[4] = 1;
  prefix.writeUInt32LE(sealedHeader.length, 8);
  return [prefix, sealedHeader, sealedMaps];
}

/** Reads only a manifest's header (listing restore points must stay cheap). */
export async function readManifestHeader(backend: StorageBackend, keys: RepositoryKeys, id: string): Promise<ManifestHeader> {
  const name = manifestPath(id);
  const prefix = await backend.getRange(name, 0, 12).catch((error: unknown) => {
    throw new SnapshiftError('REPO_FILE_DAMAGED', `manifest of restore point ${id} is damaged (cannot read its start)`, { cause: error });
  });
  return decodeHeader(keys, id, prefix, (length) => backend.getRange(name, 12, length));
}

/** Reads a whole manifest: header and chunk maps (one Buffer per disk). */
export async function readManifest(backend: StorageBackend, keys: RepositoryKeys, id: string): Promise<{ header: ManifestHeader; maps: Buffer[] }> {
  const whole = await backend.get(manifestPath(id));
  const header = await decodeHeader(keys, id, whole, async (length) => whole.subarray(12, 12 + length));
  const headerLength = whole.readUInt32LE(8);
  const all = unseal(keys, SealedType.manifestMaps, whole.subarray(12 + headerLength), `manifest of restore point ${id} (chunk maps)`);
  const maps: Buffer[] = [];
  let at = 0;
  for (const disk of header.disks) {
    const bytes = chunkCountOf(disk.sizeBytes, header.chunkSizeBytes) * 32;
    maps.push(all.subarray(at, at + bytes));
    at += bytes;
  }
  if (at !== all.length) throw new SnapshiftError('REPO_FILE_DAMAGED', `manifest of restore point ${id} is damaged (chunk maps do not match its disks)`);
  return { header, maps };
}

async function decodeHeader(keys: RepositoryKeys, id: string, prefix: Buffer, readHeader: (length: number) => Promise<Buffer>): Promise<ManifestHeader> {
  const damaged = (reason: string): SnapshiftError => new SnapshiftError('REPO_FILE_DAMAGED', `manifest of restore point ${id} is damaged (${reason})`);
  if (prefix.length < 12 || !prefix.subarray(0, 4).equals(magic)) throw damaged('bad magic');
  if (prefix[4] !== 1) throw damaged(`unknown manifest version ${prefix[4]}`);
  const headerLength = prefix.readUInt32LE(8);
  if (headerLength > 64 * 1024 * 1024) throw damaged('header length out of range');
  const sealed = await readHeader(headerLength).catch((error: unknown) => {
    throw damaged(`cannot read header: ${error instanceof Error ? error.message : String(error)}`);
  });
  const text = unseal(keys, SealedType.manifestHeader, sealed, `manifest of restore point ${id}`).toString('utf8');
  let header: ManifestHeader;
  try {
    header = JSON.parse(text) as ManifestHeader;
  } catch {
    throw damaged('header is not JSON');
  }
  if (header.id !== id || typeof header.vmName !== 'string' || !Array.isArray(header.disks) || typeof header.chunkSizeBytes !== 'number') throw damaged('header fields');
  return header;
}

export function summaryOf(header: ManifestHeader): RestorePointSummary {
  const { chunkSizeBytes: _chunkSize, ...summary } = header;
  void _chunkSize;
  return summary;
}
