// Partition tables as sfdisk writes them, read by our own parser (src/restore/file-level/partition-table.ts):
// GPT with names and the backup header taking over from a damaged primary, MBR with logical partitions in an
// extended one, a bare disk, and a GPT whose both headers are damaged. Sparse files, no root needed.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { SnapshiftError } from '../../src/core/errors.ts';
import { readPartitionTable } from '../../src/restore/file-level/index.ts';
import { makeWorkspace } from '../support/workspace.ts';

const MiB = 1024 * 1024;

async function tableOf(image: string) {
  const file = await open(image);
  try {
    const { size } = await file.stat();
    return await readPartitionTable(
      async (offset, length) => {
        const bytes = Buffer.alloc(length);
        await file.read(bytes, 0, length, offset);
        return bytes;
      },
      size,
      'vdx',
    );
  } finally {
    await file.close();
  }
}

/** sfdisk's own view, in bytes: the reference. */
async function sfdiskOf(image: string): Promise<Array<[number, number]>> {
  const table = JSON.parse((await exec('sfdisk', ['--json', image])).stdout) as { partitiontable: { partitions: Array<{ start: number; size: number; type: string }> } };
  return table.partitiontable.partitions.filter((partition) => !['5', 'f', '85'].includes(partition.type)).map((partition) => [partition.start * 512, partition.size * 512]);
}

async function makeImage(path: string, sizeBytes: number, script: string): Promise<void> {
  await exec('truncate', ['-s', String(sizeBytes), path]);
  await exec('sfdisk', ['--quiet', path], { input: script });
}

describe('partition tables', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  before(async () => {
    workspace = await makeWorkspace('parttable');
  });
  after(async () => {
    await workspace?.cleanup();
  });

  test('GPT: numbers, offsets, sizes, type GUIDs and names as sfdisk wrote them; the backup header serves when the primary is damaged', async () => {
    const image = join(workspace.dir, 'gpt.raw');
    await makeImage(image, 64 * MiB, 'label: gpt\nsize=8MiB, type=linux, name="root fs"\nsize=4MiB, type=swap\nsize=16MiB, type=uefi, name="ESP"\n');
    const table = await tableOf(image);
    assert.equal(table.scheme, 'gpt');
    assert.deepEqual(table.partitions.map((partition) => [partition.startBytes, partition.sizeBytes]), await sfdiskOf(image));
    assert.deepEqual(table.partitions.map((partition) => [partition.number, partition.type, partition.name]), [
      [1, '0FC63DAF-8483-4772-8E79-3D69D8477DE4', 'root fs'],
      [2, '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F', ''],
      [3, 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B', 'ESP'],
    ]);

    // Zero the primary header (LBA 1): its CRC fails, the backup at the last LBA has the same table.
    const handle = await open(image, 'r+');
    await handle.write(Buffer.alloc(512), 0, 512, 512);
    await handle.close();
    assert.deepEqual((await tableOf(image)).partitions, table.partitions);

    // Both headers gone, protective MBR still there: a clear error rather than a guess.
    const both = await open(image, 'r+');
    await both.write(Buffer.alloc(512), 0, 512, 64 * MiB - 512);
    await both.close();
    await assert.rejects(tableOf(image), (error: unknown) => error instanceof SnapshiftError && error.code === 'FILES_PARTITION_TABLE_BAD' && /neither GPT header/.test(error.message));
  });

  test('MBR: primary partitions and logical ones in an extended partition (numbered from 5)', async () => {
    const image = join(workspace.dir, 'mbr.raw');
    // Named lines: logical partitions are 5 and up, whatever primary slots are free.
    const lines = ['1 : size=8MiB, type=83', '2 : size=40MiB, type=5', '5 : size=10MiB, type=83', '6 : size=12MiB, type=82', '7 : size=6MiB, type=83'];
    await makeImage(image, 64 * MiB, `label: dos\n${lines.map((line) => `${image}${line}`).join('\n')}\n`);
    const table = await tableOf(image);
    assert.equal(table.scheme, 'mbr');
    assert.deepEqual(table.partitions.map((partition) => partition.number), [1, 5, 6, 7]);
    assert.deepEqual(table.partitions.map((partition) => partition.type), ['83', '83', '82', '83']);
    assert.deepEqual(table.partitions.map((partition) => [partition.startBytes, partition.sizeBytes]), await sfdiskOf(image));
  });

  test('a disk without a table (zeros, or a filesystem on the whole disk) has none', async () => {
    const image = join(workspace.dir, 'bare.raw');
    await writeFile(image, Buffer.alloc(4 * MiB));
    assert.deepEqual(await tableOf(image), { scheme: 'none', sectorBytes: 512, partitions: [] });
  });
});
