import { SnapshiftError } from '../core/errors.ts';
import type { RepositoryKeys } from './repository-keys.ts';
import { SealedType, seal, unseal } from './sealed-file.ts';

/** One blob as a pack trailer or an index file lists it (docs/FORMAT.md § Packs, § Index files). */
export interface BlobEntry {
  id: Buffer;
  offsetBytes: number;
  storedLength: number;
  rawLength: number;
  compressed: boolean;
}

const trailerEntryBytes = 45;
const packMagic = Buffer.from('SNPK');

/** The bytes that close a pack: sealed trailer, its length, magic. */
export function encodePackTrailer(keys: RepositoryKeys, blobs: readonly BlobEntry[]): Buffer {
  const body = Buffer.alloc(4 + blobs.length * trailerEntryBytes);
  body.writeUInt32LE(blobs.length, 0);
  blobs.forEach((blob, i) => {
    const base = 4 + i * trailerEntryBytes;
    blob.id.copy(body, base);
    body.writeUInt32LE(blob.offsetBytes, base + 32);
    body.writeUInt32LE(blob.storedLength, base + 36);
    body.writeUInt32LE(blob.rawLength, base + 40);
    body[base + 44] = blob.compressed ? 1 : 0;
  });
  const sealed = seal(keys, SealedType.packTrailer, body);
  const tail = Buffer.alloc(8);
  tail.writeUInt32LE(sealed.length, 0);
  packMagic.copy(tail, 4);
  return Buffer.concat([sealed, tail]);
}

/** Reads a pack's blob list from its last bytes; `readRange` reads from the pack. */
export async function readPackTrailer(keys: RepositoryKeys, packName: string, packSizeBytes: number, readRange: (offset: number, length: number) => Promise<Buffer>): Promise<BlobEntry[]> {
  return (await readPackTail(keys, packName, packSizeBytes, readRange)).blobs;
}

/** A pack's blob list and where its sealed trailer starts (= the bytes its blobs take, back to back). */
export async function readPackTail(keys: RepositoryKeys, packName: string, packSizeBytes: number, readRange: (offset: number, length: number) => Promise<Buffer>): Promise<{ blobs: BlobEntry[]; trailerOffsetBytes: number }> {
  const damaged = (reason: string): SnapshiftError => new SnapshiftError('REPO_FILE_DAMAGED', `pack ${packName} is damaged (${reason})`);
  if (packSizeBytes < 8) throw damaged('too short');
  const tail = await readRange(packSizeBytes - 8, 8);
  if (!tail.subarray(4).equals(packMagic)) throw damaged('no pack magic at its end');
  const trailerLength = tail.readUInt32LE(0);
  if (trailerLength + 8 > packSizeBytes) throw damaged('trailer length out of range');
  const trailerOffsetBytes = packSizeBytes - 8 - trailerLength;
  const body = unseal(keys, SealedType.packTrailer, await readRange(trailerOffsetBytes, trailerLength), `trailer of pack ${packName}`);
  return { blobs: decodeEntries(body, 0, trailerEntryBytes, () => damaged('trailer body has a wrong length or an unknown blob flag')), trailerOffsetBytes };
}

/**
 * Why a pack's trailer does not describe blobs stored back to back from byte 0 up to the trailer, in
 * trailer order (docs/FORMAT.md § Packs), or undefined when it does.
 */
export function packLayoutProblem(blobs: readonly BlobEntry[], trailerOffsetBytes: number): string | undefined {
  let expected = 0;
  for (const blob of blobs) {
    if (blob.offsetBytes !== expected) return `blob ${blob.id.toString('hex')} starts at byte ${blob.offsetBytes}, not ${expected} where the blob before it ends`;
    expected += blob.storedLength;
  }
  return expected === trailerOffsetBytes ? undefined : `its blobs end at byte ${expected}, but its trailer starts at byte ${trailerOffsetBytes}`;
}

/** Blob flags (docs/FORMAT.md § Blobs): bit 0 = zstd-compressed; any other bit set means a damaged entry. */
function compressedFlag(flags: number, damaged: () => Error): boolean {
  if (flags > 1) throw damaged();
  return flags === 1;
}

function decodeEntries(body: Buffer, start: number, entryBytes: number, damaged: () => Error): BlobEntry[] {
  if (body.length < start + 4) throw damaged();
  const count = body.readUInt32LE(start);
  if (body.length !== start + 4 + count * entryBytes) throw damaged();
  const blobs: BlobEntry[] = [];
  for (let i = 0; i < count; i++) {
    const base = start + 4 + i * entryBytes;
    blobs.push({
      id: Buffer.from(body.subarray(base, base + 32)),
      offsetBytes: body.readUInt32LE(base + 32),
      storedLength: body.readUInt32LE(base + 36),
      rawLength: body.readUInt32LE(base + 40),
      compressed: compressedFlag(body[base + 44]!, damaged),
    });
  }
  return blobs;
}

/** The content of one index file: blobs per pack. */
export interface IndexFileContent {
  packs: Array<{ packId: string; blobs: BlobEntry[] }>;
}

const indexEntryBytes = 49;

export function encodeIndexFile(keys: RepositoryKeys, content: IndexFileContent): Buffer {
  const entryCount = content.packs.reduce((sum, pack) => sum + pack.blobs.length, 0);
  const body = Buffer.alloc(4 + content.packs.length * 32 + 4 + entryCount * indexEntryBytes);
  let at = body.writeUInt32LE(content.packs.length, 0);
  for (const pack of content.packs) at += Buffer.from(pack.packId, 'hex').copy(body, at);
  at = body.writeUInt32LE(entryCount, at);
  content.packs.forEach((pack, ordinal) => {
    for (const blob of pack.blobs) {
      blob.id.copy(body, at);
      body.writeUInt32LE(ordinal, at + 32);
      body.writeUInt32LE(blob.offsetBytes, at + 36);
      body.writeUInt32LE(blob.storedLength, at + 40);
      body.writeUInt32LE(blob.rawLength, at + 44);
      body[at + 48] = blob.compressed ? 1 : 0;
      at += indexEntryBytes;
    }
  });
  return seal(keys, SealedType.index, body);
}

export function decodeIndexFile(keys: RepositoryKeys, sealed: Buffer, name: string): IndexFileContent {
  const body = unseal(keys, SealedType.index, sealed, `index file ${name}`);
  const damaged = (): SnapshiftError => new SnapshiftError('REPO_FILE_DAMAGED', `index file ${name} is damaged (wrong body length, pack ordinal or blob flag)`);
  if (body.length < 8) throw damaged();
  const packCount = body.readUInt32LE(0);
  const entriesAt = 4 + packCount * 32;
  if (body.length < entriesAt + 4) throw damaged();
  const packs: IndexFileContent['packs'] = [];
  for (let i = 0; i < packCount; i++) packs.push({ packId: body.subarray(4 + i * 32, 36 + i * 32).toString('hex'), blobs: [] });
  const entryCount = body.readUInt32LE(entriesAt);
  if (body.length !== entriesAt + 4 + entryCount * indexEntryBytes) throw damaged();
  for (let i = 0; i < entryCount; i++) {
    const base = entriesAt + 4 + i * indexEntryBytes;
    const pack = packs[body.readUInt32LE(base + 32)];
    if (!pack) throw damaged();
    pack.blobs.push({
      id: Buffer.from(body.subarray(base, base + 32)),
      offsetBytes: body.readUInt32LE(base + 36),
      storedLength: body.readUInt32LE(base + 40),
      rawLength: body.readUInt32LE(base + 44),
      compressed: compressedFlag(body[base + 48]!, damaged),
    });
  }
  return { packs };
}

/** Where a pack lives: data/<first 2 hex>/<id>. */
export function packPath(packId: string): string {
  return `data/${packId.slice(0, 2)}/${packId}`;
}
