// A reader written from docs/FORMAT.md alone (node:crypto, BLAKE3, zstd; nothing from src/repository but the
// writer), so that what the spec says and what the code writes cannot drift apart unnoticed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createDecipheriv, scrypt } from 'node:crypto';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { decompress } from 'zstd-napi';
import { checkRepository, initRepository, openRepository } from '../../src/repository/index.ts';
import { backup, restoreAll, seededBytes, tempDir } from './helpers.ts';

const chunk = 256 * 1024;

async function filesUnder(root: string, folder: string): Promise<string[]> {
  const result: string[] = [];
  for (const entry of await readdir(join(root, folder), { withFileTypes: true, recursive: true })) if (entry.isFile()) result.push(join(entry.parentPath ?? entry.path, entry.name).slice(root.length + 1));
  return result.sort();
}

interface SpecKeys {
  dataKey?: Buffer;
  idKey: Buffer;
}

/** FORMAT § Sealed files: returns the body and the flags byte. */
function openSealed(keys: SpecKeys, file: Buffer, type: number): { body: Buffer; flags: number } {
  assert.equal(file.subarray(0, 4).toString('latin1'), 'SNSF');
  assert.equal(file[4], 1);
  assert.equal(file[5], type);
  const flags = file[6]!;
  assert.equal(file[7], 0);
  let payload: Buffer;
  if (flags & 1) {
    const decipher = createDecipheriv('aes-256-gcm', keys.dataKey!, file.subarray(8, 20));
    decipher.setAAD(file.subarray(0, 8));
    decipher.setAuthTag(file.subarray(file.length - 16));
    payload = Buffer.concat([decipher.update(file.subarray(20, file.length - 16)), decipher.final()]);
  } else {
    // The checksum covers the body as stored (compressed when bit 1 is set), not the decompressed one.
    payload = file.subarray(8, file.length - 16);
    const checksumKey = Blake3Hasher.deriveKey('snapshift v1 sealed-file checksum', keys.idKey);
    const checksum = Blake3Hasher.newKeyed(checksumKey).update(file.subarray(0, 8)).update(payload).digestBuffer().subarray(0, 16);
    assert.ok(checksum.equals(file.subarray(file.length - 16)), 'checksum over bytes 0..7 || stored body');
  }
  return { body: flags & 2 ? decompress(payload) : payload, flags };
}

interface Entry {
  id: string;
  offset: number;
  storedLength: number;
  rawLength: number;
  flags: number;
}

function entries(body: Buffer, at: number, entryBytes: number, packOf?: (ordinal: number) => string): Array<Entry & { pack?: string }> {
  const count = body.readUInt32LE(at);
  assert.equal(body.length, at + 4 + count * entryBytes);
  const result = [];
  for (let i = 0, base = at + 4; i < count; i++, base += entryBytes) {
    const shift = packOf ? 4 : 0;
    result.push({
      id: body.subarray(base, base + 32).toString('hex'),
      ...(packOf ? { pack: packOf(body.readUInt32LE(base + 32)) } : {}),
      offset: body.readUInt32LE(base + 32 + shift),
      storedLength: body.readUInt32LE(base + 36 + shift),
      rawLength: body.readUInt32LE(base + 40 + shift),
      flags: body[base + 44 + shift]!,
    });
  }
  return result;
}

/** FORMAT § Packs: the trailer's entries, after checking the footer and that blobs lie back to back from byte 0. */
function readPack(keys: SpecKeys, pack: Buffer): Entry[] {
  assert.equal(pack.subarray(pack.length - 4).toString('latin1'), 'SNPK');
  const trailerLength = pack.readUInt32LE(pack.length - 8); // the sealed trailer alone, not the 8-byte footer
  const trailerStart = pack.length - 8 - trailerLength;
  const { body, flags } = openSealed(keys, pack.subarray(trailerStart, pack.length - 8), 4);
  assert.equal(flags & 2, 0, 'pack trailers are not compressed');
  const blobs = entries(body, 0, 45);
  let expected = 0;
  for (const blob of blobs) {
    assert.equal(blob.offset, expected, 'blobs back to back, offsets from the pack start');
    expected += blob.storedLength;
  }
  assert.equal(expected, trailerStart, 'the trailer follows the last blob');
  return blobs;
}

/** FORMAT § Blobs: the plaintext of a blob; compression is known from the entry's flags, not the blob bytes. */
function openBlob(keys: SpecKeys, id: Buffer, blob: Buffer, entry: Entry): Buffer {
  let data = blob;
  if (keys.dataKey) {
    const decipher = createDecipheriv('aes-256-gcm', keys.dataKey, blob.subarray(0, 12));
    decipher.setAAD(id);
    decipher.setAuthTag(blob.subarray(blob.length - 16));
    data = Buffer.concat([decipher.update(blob.subarray(12, blob.length - 16)), decipher.final()]);
  }
  assert.ok(entry.flags === 0 || entry.flags === 1, 'only bit 0 of the blob flags is used');
  if (entry.flags === 1) {
    assert.equal(data.readUInt32LE(0), 0xfd2fb528, 'a compressed blob is a zstd frame');
    // Frame header descriptor: the content-size flag (bits 6-7) or single-segment (bit 5) says the frame
    // carries its content size, which a reader needs when the index's rawLength is 0.
    const descriptor = data[4]!;
    assert.ok((descriptor & 0xc0) !== 0 || (descriptor & 0x20) !== 0, 'the frame records its content size');
    data = decompress(data);
  }
  assert.equal(data.length, entry.rawLength);
  return data;
}

function keyedId(idKey: Buffer, plaintext: Buffer): Buffer {
  return Blake3Hasher.newKeyed(idKey).update(plaintext).digestBuffer();
}

/** Reads every restore point of a repository the way FORMAT.md describes, returning the disks' bytes. */
async function readLikeAnOutsider(root: string, keys: SpecKeys): Promise<Map<string, { header: Record<string, unknown>; disks: Map<string, Buffer>; maps: Map<string, Buffer> }>> {
  const config = JSON.parse(await readFile(join(root, 'config'), 'utf8')) as { chunkSizeBytes: number };
  const index = new Map<string, Entry & { pack?: string }>();
  for (const name of await filesUnder(root, 'index')) {
    assert.match(name, /^index\/[0-9a-f]{64}$/);
    const { body, flags } = openSealed(keys, await readFile(join(root, name)), 1);
    assert.equal(flags & 2, 0, 'index files are not compressed');
    const packCount = body.readUInt32LE(0);
    const packIds = Array.from({ length: packCount }, (_, i) => body.subarray(4 + i * 32, 36 + i * 32).toString('hex'));
    for (const entry of entries(body, 4 + packCount * 32, 49, (ordinal) => packIds[ordinal]!)) index.set(entry.id, entry);
  }
  const packs = new Map<string, Buffer>();
  const result = new Map<string, { header: Record<string, unknown>; disks: Map<string, Buffer>; maps: Map<string, Buffer> }>();
  for (const name of await filesUnder(root, 'manifests')) {
    assert.match(name, /^manifests\/[0-9a-f]{32}$/, 'restore point ids are 16 bytes');
    const file = await readFile(join(root, name));
    assert.equal(file.subarray(0, 4).toString('latin1'), 'SNMF');
    assert.deepEqual([...file.subarray(4, 8)], [1, 0, 0, 0]);
    const headerLength = file.readUInt32LE(8);
    const sealedHeader = openSealed(keys, file.subarray(12, 12 + headerLength), 2);
    assert.equal(sealedHeader.flags & 2, 0, 'manifest headers are not compressed');
    const header = JSON.parse(sealedHeader.body.toString('utf8')) as { id: string; chunkSizeBytes: number; disks: Array<{ name: string; sizeBytes: number; storedChunks: number; zeroChunks: number }> };
    assert.equal(header.id, name.slice('manifests/'.length));
    assert.equal(header.chunkSizeBytes, config.chunkSizeBytes);
    const sealedMaps = openSealed(keys, file.subarray(12 + headerLength), 3);
    assert.equal(sealedMaps.flags & 2, 2, 'chunk maps are compressed');
    const disks = new Map<string, Buffer>();
    const maps = new Map<string, Buffer>();
    let at = 0;
    for (const disk of header.disks) {
      const count = Math.ceil(disk.sizeBytes / header.chunkSizeBytes);
      const map = sealedMaps.body.subarray(at, at + count * 32);
      at += count * 32;
      maps.set(disk.name, map);
      const out = Buffer.alloc(disk.sizeBytes);
      let zeroChunks = 0;
      for (let i = 0; i < count; i++) {
        const id = map.subarray(i * 32, i * 32 + 32);
        if (id.equals(Buffer.alloc(32))) {
          zeroChunks++;
          continue;
        }
        const entry = index.get(id.toString('hex'))!;
        assert.ok(entry, `chunk ${id.toString('hex')} is indexed`);
        const packName = `data/${entry.pack!.slice(0, 2)}/${entry.pack}`;
        if (!packs.has(packName)) {
          const pack = await readFile(join(root, packName));
          const trailer = readPack(keys, pack);
          const listed = trailer.find((blob) => blob.id === entry.id)!;
          assert.deepEqual({ ...listed }, { id: entry.id, offset: entry.offset, storedLength: entry.storedLength, rawLength: entry.rawLength, flags: entry.flags });
          packs.set(packName, pack);
        }
        const data = openBlob(keys, id, packs.get(packName)!.subarray(entry.offset, entry.offset + entry.storedLength), entry);
        assert.ok(keyedId(keys.idKey, data).equals(id), 'the id is the keyed BLAKE3 of the plaintext, a short last chunk unpadded');
        data.copy(out, i * header.chunkSizeBytes);
      }
      assert.equal(disk.zeroChunks, zeroChunks);
      assert.equal(disk.storedChunks, count - zeroChunks);
      disks.set(disk.name, out);
    }
    assert.equal(at, sealedMaps.body.length);
    result.set(header.id, { header, disks, maps });
  }
  return result;
}

test('an outsider reading by FORMAT.md alone: short last chunks unpadded, a short zero one is the zero id, counts, layout, checksums', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { encryption: false, chunkSizeBytes: chunk, compression: 'zstd', packTargetBytes: 3 * chunk });
  const config = JSON.parse(await readFile(join(dir.path, 'config'), 'utf8')) as Record<string, unknown>;
  assert.equal(config.compression, 'zstd:1', 'init writes the one spelling the spec allows');
  assert.match(String(config.id), /^[0-9a-f]{32}$/);
  const idKey = Buffer.from(String(config.idKey), 'hex');
  const text = (length: number, seed: string): Buffer => Buffer.alloc(length, `${seed} compresses well `);
  // vda: random, text, and a short text tail. vdb: random, then a short tail of zeros. vdc: zeros sent as
  // data, a hole, and text, so all-zero data and holes both become the zero id.
  const vda = Buffer.concat([seededBytes(Buffer.alloc(32, 1), 0, chunk), text(chunk, 'a'), text(1000, 'tail')]);
  const vdb = Buffer.concat([seededBytes(Buffer.alloc(32, 2), 0, chunk), Buffer.alloc(500)]);
  const vdc = Buffer.concat([Buffer.alloc(2 * chunk), text(chunk, 'c')]);
  let pointId: string;
  {
    await using repository = await openRepository(dir.path, {});
    const writer = await repository.startBackup({ vmName: 'vm1' });
    for (const [name, data] of [['vda', vda], ['vdb', vdb]] as const) {
      const disk = writer.addDisk(name, data.length);
      for (let at = 0; at < data.length; at += chunk) await disk.putChunk(at, Buffer.from(data.subarray(at, Math.min(data.length, at + chunk))));
    }
    const disk = writer.addDisk('vdc', vdc.length);
    await disk.putChunk(0, Buffer.alloc(chunk));
    await disk.putZero(chunk, chunk);
    await disk.putChunk(2 * chunk, Buffer.from(vdc.subarray(2 * chunk)));
    pointId = (await writer.commit()).id;
  }

  const points = await readLikeAnOutsider(dir.path, { idKey });
  const point = points.get(pointId)!;
  assert.ok(point.disks.get('vda')!.equals(vda));
  assert.ok(point.disks.get('vdb')!.equals(vdb));
  assert.ok(point.disks.get('vdc')!.equals(vdc));
  const ids = (name: string): string[] => Array.from({ length: point.maps.get(name)!.length / 32 }, (_, i) => point.maps.get(name)!.subarray(i * 32, i * 32 + 32).toString('hex'));
  const zeroId = '0'.repeat(64);
  assert.equal(ids('vda')[2], keyedId(idKey, text(1000, 'tail')).toString('hex'), 'a short last chunk is hashed as it is, not padded');
  assert.deepEqual(ids('vdb').slice(1), [zeroId], 'a short all-zero last chunk is the zero id');
  assert.deepEqual(ids('vdc').slice(0, 2), [zeroId, zeroId]);
  assert.deepEqual((point.header.disks as Array<Record<string, unknown>>).map((d) => [d.name, d.storedChunks, d.zeroChunks]), [['vda', 3, 0], ['vdb', 1, 1], ['vdc', 1, 2]]);

  // An incremental: storedChunks counts every non-zero id of the map (also those inherited), not what it wrote.
  await using repository = await openRepository(dir.path, {});
  const writer = await repository.startBackup({ vmName: 'vm1', baseRestorePointId: pointId });
  const disk = writer.addDisk('vda', vda.length);
  await disk.putZero(0, chunk);
  writer.addDisk('vdb', vdb.length);
  const incremental = await writer.commit();
  assert.deepEqual(incremental.disks.map((d) => [d.name, d.storedChunks, d.zeroChunks]), [['vda', 2, 1], ['vdb', 1, 1]]);
  const expected = Buffer.from(vda);
  expected.fill(0, 0, chunk);
  assert.ok((await readLikeAnOutsider(dir.path, { idKey })).get(incremental.id)!.disks.get('vda')!.equals(expected));
  assert.ok((await restoreAll(repository, incremental.id, 'vda')).equals(expected));
});

test('an encrypted repository by FORMAT.md: key slot ids, scrypt key slot, GCM blobs and sealed files', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { password: 'pw', encryption: true, chunkSizeBytes: chunk });
  const data = Buffer.concat([seededBytes(Buffer.alloc(32, 3), 0, chunk), Buffer.alloc(chunk, 'text '), Buffer.alloc(77, 'x')]);
  let pointId: string;
  {
    await using repository = await openRepository(dir.path, { password: 'pw' });
    pointId = (await backup(repository, 'vm1', { vda: data })).id;
  }
  const slots = await filesUnder(dir.path, 'keys');
  assert.equal(slots.length, 1);
  assert.match(slots[0]!, /^keys\/[0-9a-f]{16}\.json$/, 'key slot ids are 8 bytes');
  const slot = JSON.parse(await readFile(join(dir.path, slots[0]!), 'utf8')) as { N: number; r: number; p: number; salt: string; nonce: string; wrappedKey: string };
  const wrapKey = await new Promise<Buffer>((resolve, reject) => scrypt('pw', Buffer.from(slot.salt, 'base64'), 32, { N: slot.N, r: slot.r, p: slot.p, maxmem: 64 * 1024 * 1024 }, (error, key) => (error ? reject(error) : resolve(key))));
  const wrapped = Buffer.from(slot.wrappedKey, 'base64');
  const decipher = createDecipheriv('aes-256-gcm', wrapKey, Buffer.from(slot.nonce, 'base64'));
  decipher.setAAD(Buffer.from('snapshift-key-v1'));
  decipher.setAuthTag(wrapped.subarray(64));
  const master = Buffer.concat([decipher.update(wrapped.subarray(0, 64)), decipher.final()]);
  const keys = { dataKey: master.subarray(0, 32), idKey: master.subarray(32) };
  const point = (await readLikeAnOutsider(dir.path, keys)).get(pointId)!;
  assert.ok(point.disks.get('vda')!.equals(data));
  for (const name of await filesUnder(dir.path, 'index')) assert.equal((await readFile(join(dir.path, name)))[6], 1, 'index files: encrypted, not compressed');
});

test('config: "zstd" as earlier versions wrote it still opens; packTargetBytes outside 1 byte .. 1 GiB is refused', async () => {
  await using dir = await tempDir();
  const repo = join(dir.path, 'repo');
  await initRepository(repo, { encryption: false, chunkSizeBytes: chunk, compression: 'zstd:3' });
  const configPath = join(repo, 'config');
  const config = JSON.parse(await readFile(configPath, 'utf8')) as Record<string, unknown>;
  assert.equal(config.compression, 'zstd:3');
  await writeFile(configPath, JSON.stringify({ ...config, compression: 'zstd' }));
  const data = Buffer.alloc(2 * chunk, 'compressible ');
  {
    await using repository = await openRepository(repo, {});
    const point = await backup(repository, 'vm1', { vda: data });
    assert.ok((await restoreAll(repository, point.id, 'vda')).equals(data));
    const check = await checkRepository(repository, { readDataPercent: 100 });
    assert.deepEqual([check.problems, check.warnings], [[], []]);
  }
  for (const packTargetBytes of [0, 0.5, 2 ** 30 + 1]) {
    await writeFile(configPath, JSON.stringify({ ...config, packTargetBytes }));
    await assert.rejects(openRepository(repo, {}), (error: Error & { code?: string }) => error.code === 'REPO_CONFIG_DAMAGED' && /packTargetBytes/.test(error.message));
    await assert.rejects(initRepository(join(dir.path, `other-${packTargetBytes}`), { encryption: false, packTargetBytes }), (error: Error & { code?: string }) => error.code === 'BAD_ARGUMENT');
  }
});
