// Our own qcow2 writer (restore --format qcow2 to a file): images qemu-img checks clean, that read back bit
// for bit, that QEMU can go on writing to (refcounts right), with zero chunks left unallocated.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { qcow2Layout } from '../../src/restore/qcow2-layout.ts';
import { mixedDisk, seededBytes, tempDir } from '../repository/helpers.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const md5 = (data: Buffer) => createHash('md5').update(data).digest('hex');

interface CheckReport {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'allocated-clusters': number;
}

async function qemuImgCheck(path: string): Promise<CheckReport> {
  return JSON.parse((await exec('qemu-img', ['check', '--output=json', path])).stdout) as CheckReport;
}

async function guestView(path: string, scratch: string): Promise<Buffer> {
  const raw = join(scratch, `view-${process.hrtime.bigint()}.raw`);
  await exec('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', path, raw]);
  return readFile(raw);
}

test('a small disk of 256 KiB chunks and an unaligned size: clean, bit for bit, zero chunks unallocated, and QEMU writes on', async () => {
  await using dir = await tempDir();
  const chunk = 256 * KiB;
  await initRepository(join(dir.path, 'repo'), { encryption: false, chunkSizeBytes: chunk });
  await using repository = await openRepository(join(dir.path, 'repo'), {});
  const data = mixedDisk(40 * chunk + 5, chunk, 21);
  const writer = await repository.startBackup({ vmName: 'vm1' });
  const disk = writer.addDisk('vda', data.length);
  for (let at = 0; at < data.length; at += chunk) await disk.putChunk(at, Buffer.from(data.subarray(at, Math.min(data.length, at + chunk))));
  const point = await writer.commit();
  const target = join(dir.path, 'vda.qcow2');
  await restoreDisk(await repository.openRestorePoint(point.id), 'vda', target, { format: 'qcow2', force: false, chunkSizeBytes: chunk });

  const report = await qemuImgCheck(target);
  assert.equal(report['check-errors'], 0);
  assert.equal(report.corruptions ?? 0, 0);
  assert.equal(report.leaks ?? 0, 0);
  let dataClusters = 0; // the last chunk is 5 bytes: one cluster
  for (let at = 0; at < data.length; at += chunk) {
    const piece = data.subarray(at, Math.min(data.length, at + chunk));
    if (!piece.every((b) => b === 0)) dataClusters += Math.ceil(piece.length / (64 * KiB));
  }
  assert.equal(report['allocated-clusters'], dataClusters, 'only data chunks hold clusters');
  const view = await guestView(target, dir.path);
  assert.equal(view.length, Math.ceil(data.length / 512) * 512, 'virtual size rounded up to 512 as qcow2 wants');
  assert.equal(md5(view.subarray(0, data.length)), md5(data));

  // QEMU allocates new clusters after ours and updates refcounts: the image stays clean.
  await exec('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 2M 512k', '-c', `write -P 0x6b ${chunk * 2} 64k`, target]);
  assert.equal((await qemuImgCheck(target))['check-errors'], 0);
  const after = await guestView(target, dir.path);
  assert.ok(after.subarray(2 * MiB, 2 * MiB + 512 * KiB).every((b) => b === 0x5a));
  assert.ok(after.subarray(chunk * 2, chunk * 2 + 64 * KiB).every((b) => b === 0x6b));
});

test('a 1.5 GiB disk with data in three L2 tables (1 MiB chunks): clean and bit for bit', async () => {
  await using dir = await tempDir();
  await initRepository(join(dir.path, 'repo'), { encryption: true, password: 'pw' });
  await using repository = await openRepository(join(dir.path, 'repo'), { password: 'pw' });
  const sizeBytes = 1536 * MiB;
  const dataAt = [0, 1 * MiB, 511 * MiB, 512 * MiB, 900 * MiB, 1535 * MiB];
  const writer = await repository.startBackup({ vmName: 'vm1' });
  const disk = writer.addDisk('vda', sizeBytes);
  for (const offset of dataAt) await disk.putChunk(offset, seededBytes(Buffer.alloc(32, 7), offset / MiB, MiB));
  const point = await writer.commit();
  const target = join(dir.path, 'vda.qcow2');
  await restoreDisk(await repository.openRestorePoint(point.id), 'vda', target, { format: 'qcow2', force: false, chunkSizeBytes: MiB });
  const report = await qemuImgCheck(target);
  assert.equal(report['check-errors'], 0);
  assert.equal(report['allocated-clusters'], dataAt.length * 16);
  const map = JSON.parse((await exec('qemu-img', ['map', '--output=json', target])).stdout) as Array<{ start: number; length: number; data: boolean }>;
  assert.deepEqual(map.filter((e) => e.data).map((e) => [e.start, e.length]), [[0, 2 * MiB], [511 * MiB, 2 * MiB], [900 * MiB, MiB], [1535 * MiB, MiB]]);
  for (const offset of dataAt) {
    const { stdout } = await exec('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -v ${offset} 16`, target]);
    const first16 = seededBytes(Buffer.alloc(32, 7), offset / MiB, 16);
    assert.match(stdout.replace(/\s+/g, ' '), new RegExp([...first16].map((b) => b.toString(16).padStart(2, '0')).join(' ')), `data at ${offset}`);
  }
});

test('the layout grows its refcount structures to cover themselves', () => {
  // 2^15 clusters fill one refcount block exactly: with the metadata around them, two are needed.
  const chunk = 2 * MiB;
  const offsets = Array.from({ length: 1024 }, (_, n) => n * chunk);
  const layout = qcow2Layout(1024 * chunk, chunk, offsets);
  const clusters = layout.fileSizeBytes / (64 * KiB);
  const refcountTableClusters = layout.metadata.readUInt32BE(56);
  const refcountTable = layout.metadata.readBigUInt64BE(48);
  const blocks: bigint[] = [];
  for (let i = 0; i < (refcountTableClusters * 64 * KiB) / 8; i++) {
    const entry = layout.metadata.readBigUInt64BE(Number(refcountTable) + i * 8);
    if (entry !== 0n) blocks.push(entry);
  }
  assert.ok(blocks.length * 32768 >= clusters, `${blocks.length} refcount blocks cover ${clusters} clusters`);
  assert.equal(blocks.length, 2);
});
