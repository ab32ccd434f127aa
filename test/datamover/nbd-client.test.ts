import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { exec, start } from '../../src/core/exec.ts';
import { NbdClient, type Extent } from '../../src/datamover/nbd/index.ts';
import { alignRegions, collectRegions, dataRegions, dirtyRegions } from '../../src/datamover/extent-map.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { writePattern } from '../../src/lab/nbd-writer.ts';
import { hasCode } from '../support/assertions.ts';

const MiB = 1024 * 1024;
const KiB = 1024;


/** nbdinfo's view of a meta context, merged like ours so both sides compare as maps. */
async function nbdinfoMap(uri: string, context: string): Promise<Extent[]> {
  const { stdout } = await exec('nbdinfo', ['--json', `--map=${context}`, uri]);
  const rows = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
  return mergeSameFlags(rows.map((row) => ({ offset: row.offset, length: row.length, flags: row.type })));
}

function mergeSameFlags(extents: Iterable<Extent>): Extent[] {
  const merged: Extent[] = [];
  for (const extent of extents) {
    const last = merged.at(-1);
    if (last && last.flags === extent.flags && last.offset + last.length === extent.offset) last.length += extent.length;
    else merged.push({ ...extent });
  }
  return merged;
}

const sha256 = (bytes: Buffer) => createHash('sha256').update(bytes).digest('hex');

describe('NbdClient against qemu-storage-daemon', () => {
  let dir: string;
  let daemon: StorageDaemon;
  let qmp: QmpClient;
  let uri: string;
  /** The disk as qemu-img convert reads it: the reference for our reads. */
  let reference: Buffer;
  const sizeBytes = 64 * MiB;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'snapshift-nbd-'));
    // Known layout, written without our client: random data at 1 MiB (3 MiB) and 10 MiB + 4 KiB (100 KiB),
    // a pattern at 40 MiB, explicit zeros at 20 MiB; the rest never written.
    const raw = join(dir, 'layout.raw');
    await exec('truncate', ['-s', String(sizeBytes), raw]);
    await exec('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'seek=1', 'count=3', 'conv=notrunc', 'status=none']);
    await exec('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=4K', `seek=${(10 * MiB + 4 * KiB) / (4 * KiB)}`, 'count=25', 'conv=notrunc', 'status=none']);
    await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, join(dir, 'disk.qcow2')]);
    await exec('qemu-io', ['-f', 'qcow2', join(dir, 'disk.qcow2'), '-c', 'write -P 0x5a 40M 512k', '-c', 'write -z 20M 1M']);
    await rm(raw);
    daemon = await StorageDaemon.start({ dir, images: [{ path: join(dir, 'disk.qcow2'), format: 'qcow2' }] });
    qmp = await QmpClient.connect(daemon.qmpSocketPath);
    uri = `nbd+unix:///disk0?socket=${daemon.nbdSocketPath}`;
    await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, 'reference.raw')]);
    reference = await readFile(join(dir, 'reference.raw'));
  });

  after(async () => {
    await qmp?.close();
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  test('negotiates size, flags and meta contexts', async () => {
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0', metaContexts: ['base:allocation'] });
    assert.equal(nbd.sizeBytes, sizeBytes);
    assert.equal(nbd.readOnly, false);
    assert.equal(nbd.structuredReplies, true);
    assert.deepEqual([...nbd.metaContexts.keys()], ['base:allocation']);
    assert.ok(nbd.blockSize.maxPayloadBytes >= MiB);
  });

  test('base:allocation extents match nbdinfo --map, and data regions are where we wrote', async () => {
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0', metaContexts: ['base:allocation'] });
    const ours = await nbd.blockStatus(0, nbd.sizeBytes, 'base:allocation');
    assert.deepEqual(mergeSameFlags(ours), await nbdinfoMap(uri, 'base:allocation'));
    // qcow2 allocates 64 KiB clusters: the 100 KiB at 10 MiB + 4 KiB occupies 10 MiB .. 10 MiB + 128 KiB.
    assert.deepEqual(dataRegions(ours), [
      { offset: 1 * MiB, length: 3 * MiB },
      { offset: 10 * MiB, length: 128 * KiB },
      { offset: 40 * MiB, length: 512 * KiB },
    ]);
    assert.deepEqual(alignRegions(dataRegions(ours), MiB, nbd.sizeBytes), [
      { offset: 1 * MiB, length: 3 * MiB },
      { offset: 10 * MiB, length: 1 * MiB },
      { offset: 40 * MiB, length: 1 * MiB },
    ]);
    assert.deepEqual(await collectRegions(nbd.extents('base:allocation'), 'data'), dataRegions(ours));
  });

  test('block status loops when the server answers for less, and clips to the asked range', async () => {
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0', metaContexts: ['base:allocation'] });
    const whole = await nbd.blockStatus(0, nbd.sizeBytes, 'base:allocation');
    nbd.maxBlockStatusBytes = 3 * MiB; // forces ~22 requests
    const pieces = await nbd.blockStatus(0, nbd.sizeBytes, 'base:allocation');
    assert.ok(pieces.length > whole.length);
    assert.deepEqual(mergeSameFlags(pieces), mergeSameFlags(whole));
    const middle = await nbd.blockStatus(1.5 * MiB, 9 * MiB + 12345, 'base:allocation');
    assert.equal(middle[0]!.offset, 1.5 * MiB);
    const last = middle.at(-1)!;
    assert.equal(last.offset + last.length, 10.5 * MiB + 12345);
    assert.equal(middle.reduce((sum, extent) => sum + extent.length, 0), 9 * MiB + 12345);
  });

  test('reads hash-equal to qemu-img convert, holes zero-filled', async () => {
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    const whole = await nbd.read(0, nbd.sizeBytes); // 64 MiB: split into many requests
    assert.equal(sha256(whole), sha256(reference));
    const target = Buffer.alloc(2 * MiB, 0xff);
    await nbd.readInto(30 * MiB, target); // never written: OFFSET_HOLE chunks
    assert.ok(target.every((byte) => byte === 0));
    const unaligned = await nbd.read(10 * MiB + 4 * KiB - 7, 100 * KiB + 13);
    assert.ok(unaligned.equals(reference.subarray(10 * MiB + 4 * KiB - 7, 10 * MiB + 104 * KiB + 6)));
  });

  test('64 concurrent 1 MiB reads are all in flight at once and each gets its own bytes', async () => {
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0', maxRequestBytes: MiB });
    const reads = Array.from({ length: 64 }, (_, i) => nbd.read(((i * 7) % 64) * MiB, MiB));
    assert.equal(nbd.inFlightCount, 64);
    const results = await Promise.all(reads);
    results.forEach((bytes, i) => {
      const offset = ((i * 7) % 64) * MiB;
      assert.ok(bytes.equals(reference.subarray(offset, offset + MiB)), `read at ${offset}`);
    });
    assert.equal(nbd.inFlightCount, 0);
  });

  test('writes read back, also through a second connection, and nbdinfo sees them', async () => {
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    await writePattern(nbd, 50 * MiB, 256 * KiB, 0xc3);
    await nbd.write(50 * MiB + 256 * KiB, Buffer.from('snapshift'), { fua: true });
    await nbd.flush();
    await using other = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    const back = await other.read(50 * MiB, 256 * KiB + 9);
    assert.ok(back.subarray(0, 256 * KiB).every((byte) => byte === 0xc3));
    assert.equal(back.subarray(256 * KiB).toString(), 'snapshift');
    const { stdout } = await exec('qemu-io', ['-r', '-f', 'raw', uri, '-c', 'read -P 0xc3 50M 256k']);
    assert.match(stdout, /read 262144\/262144 bytes/);
  });

  test('a persistent dirty bitmap: our dirty extents match nbdinfo and the writes we made', async () => {
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bm0', persistent: true, granularity: 64 * KiB });
    {
      await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
      await writePattern(nbd, 5 * MiB + 64 * KiB, 64 * KiB, 1);
      await writePattern(nbd, 33 * MiB, MiB + 4 * KiB, 2); // dirties 33 MiB .. 34 MiB + 64 KiB
      await writePattern(nbd, 63 * MiB, MiB, 3);
    }
    // A read-only export refuses an enabled bitmap: freeze it, then export the node with it.
    await qmp.execute('block-dirty-bitmap-disable', { node: 'disk0', name: 'bm0' });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'ro-export', 'node-name': 'disk0', name: 'disk0-ro', writable: false, bitmaps: ['bm0'] });
    try {
      const context = 'qemu:dirty-bitmap:bm0';
      await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0-ro', metaContexts: ['base:allocation', context] });
      assert.equal(nbd.readOnly, true);
      assert.deepEqual([...nbd.metaContexts.keys()].sort(), ['base:allocation', context]);
      const ours = await nbd.blockStatus(0, nbd.sizeBytes, context);
      assert.deepEqual(mergeSameFlags(ours), await nbdinfoMap(`nbd+unix:///disk0-ro?socket=${daemon.nbdSocketPath}`, context));
      const dirty = dirtyRegions(ours);
      assert.deepEqual(dirty, [
        { offset: 5 * MiB + 64 * KiB, length: 64 * KiB },
        { offset: 33 * MiB, length: MiB + 64 * KiB },
        { offset: 63 * MiB, length: MiB },
      ]);
      assert.deepEqual(alignRegions(dirty, MiB, nbd.sizeBytes), [
        { offset: 5 * MiB, length: MiB },
        { offset: 33 * MiB, length: 2 * MiB },
        { offset: 63 * MiB, length: MiB },
      ]);
      await assert.rejects(nbd.write(0, Buffer.alloc(512)), hasCode('NBD_READ_ONLY'));
    } finally {
      await qmp.execute('block-export-del', { id: 'ro-export' });
    }
  });

  test('errors a user can act on', async () => {
    await assert.rejects(NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'nope' }), hasCode('NBD_EXPORT_NOT_FOUND', /no export named "nope"/));
    await assert.rejects(
      NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0', metaContexts: ['qemu:dirty-bitmap:missing'] }),
      hasCode('NBD_META_CONTEXT_UNAVAILABLE', /qemu:dirty-bitmap:missing/),
    );
    await assert.rejects(NbdClient.connect({ socketPath: join(dir, 'missing.sock'), exportName: 'disk0' }), hasCode('NBD_CONNECT_FAILED', /no such socket/));
    // The QMP socket is held by our QMP client, so this connection hears nothing: the handshake times out.
    await assert.rejects(NbdClient.connect({ socketPath: daemon.qmpSocketPath, exportName: 'disk0', timeoutMs: 300 }), hasCode('NBD_HANDSHAKE_FAILED', /within 300 ms/));
    const notNbd = createServer((socket) => socket.end('{"QMP": {"version": {}}}\n'));
    await new Promise<void>((resolve) => notNbd.listen(join(dir, 'not-nbd.sock'), resolve));
    try {
      await assert.rejects(NbdClient.connect({ socketPath: join(dir, 'not-nbd.sock'), exportName: 'disk0' }), hasCode('NBD_HANDSHAKE_FAILED', /is not an NBD server/));
    } finally {
      notNbd.close();
    }
    await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    await assert.rejects(nbd.read(sizeBytes - 10, 11), hasCode('BAD_ARGUMENT', /outside/));
    await assert.rejects(async () => {
      for await (const extent of nbd.extents('base:allocation')) void extent;
    }, hasCode('NBD_META_CONTEXT_UNAVAILABLE'));
  });

  test('server-side I/O errors: an error reply is NBD_COMMAND_FAILED with the errno', async () => {
    const faulty = join(dir, 'faulty.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', faulty, '16M']);
    await exec('qemu-io', ['-f', 'qcow2', faulty, '-c', 'write -P 0x11 1M 64k']);
    // blkdebug fails every data read and data write of the qcow2 with EIO (28 = ENOSPC for writes).
    await qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'faulty',
      file: {
        driver: 'blkdebug',
        image: { driver: 'file', filename: faulty },
        'inject-error': [
          { event: 'read_aio', errno: 5 },
          { event: 'write_aio', errno: 28 },
        ],
      },
    });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'faulty-export', 'node-name': 'faulty', name: 'faulty', writable: true });
    try {
      {
        await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'faulty' });
        // Structured error chunk (a non-fragmented read) and simple error reply (a write).
        await assert.rejects(nbd.read(MiB, 64 * KiB, { dontFragment: true }), hasCode('NBD_COMMAND_FAILED', /READ 1048576\+65536 failed: EIO/));
        await assert.rejects(nbd.write(MiB, Buffer.alloc(64 * KiB, 1)), hasCode('NBD_COMMAND_FAILED', /WRITE 1048576\+65536 failed: ENOSPC/));
        // Still usable after an error reply.
        assert.ok((await nbd.read(4 * MiB, 4096)).every((byte) => byte === 0));
      }
      {
        // qemu 7.2 drops the connection on a read error in a sparse (fragmented) read.
        await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'faulty' });
        await assert.rejects(nbd.read(MiB, 64 * KiB), hasCode('NBD_DISCONNECTED'));
      }
    } finally {
      await qmp.execute('block-export-del', { id: 'faulty-export', mode: 'hard' });
      // The export goes away asynchronously; wait until the node is free again.
      for (let attempt = 0; attempt < 50; attempt++) {
        try {
          await qmp.execute('blockdev-del', { 'node-name': 'faulty' });
          break;
        } catch {
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      }
    }
  });

  test('close waits for requests in flight, then disconnects cleanly', async () => {
    const nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
    const reads = Array.from({ length: 16 }, (_, i) => nbd.read(i * MiB, MiB));
    await nbd.close();
    const results = await Promise.all(reads);
    assert.ok(results[1]!.equals(reference.subarray(MiB, 2 * MiB)));
    await assert.rejects(nbd.read(0, 512), hasCode('NBD_DISCONNECTED'));
  });
});

describe('NbdClient when the server goes away', () => {
  test('requests in flight reject with NBD_DISCONNECTED when qemu-storage-daemon dies', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'snapshift-nbd-crash-'));
    const daemon = await StorageDaemon.start({ dir, images: [await blankImage(dir, 256 * MiB)] });
    try {
      const nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
      const reads = Promise.allSettled(Array.from({ length: 64 }, (_, i) => nbd.read(i * 4 * MiB, 4 * MiB)));
      await daemon.kill();
      const outcomes = await reads;
      const failures = outcomes.filter((outcome) => outcome.status === 'rejected');
      assert.ok(failures.length > 0);
      for (const failure of failures) assert.ok(hasCode('NBD_DISCONNECTED')((failure as PromiseRejectedResult).reason));
      await nbd.close();
    } finally {
      await daemon.kill();
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('TCP: reads from qemu-nbd on 127.0.0.1', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'snapshift-nbd-tcp-'));
    const image = await blankImage(dir, 16 * MiB);
    await exec('qemu-io', ['-f', 'qcow2', image.path, '-c', 'write -P 0x77 2M 1M']);
    const port = 20000 + Math.floor(Math.random() * 20000);
    const server = start('qemu-nbd', ['-f', 'qcow2', '-r', '-b', '127.0.0.1', '-p', String(port), '-x', 'tcpdisk', '--persistent', image.path]);
    try {
      let nbd: NbdClient | undefined;
      for (let attempt = 0; attempt < 100 && !nbd; attempt++) {
        nbd = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'tcpdisk' }).catch(async () => {
          await new Promise((resolve) => setTimeout(resolve, 20));
          return undefined;
        });
      }
      assert.ok(nbd, 'qemu-nbd came up');
      const bytes = await nbd.read(2 * MiB, MiB);
      assert.ok(bytes.every((byte) => byte === 0x77));
      assert.equal(nbd.readOnly, true);
      await nbd.close();
    } finally {
      const exited = new Promise((resolve) => server.once('exit', resolve));
      if (server.exitCode === null) server.kill('SIGTERM');
      await exited;
      await rm(dir, { recursive: true, force: true });
    }
  });
});

async function blankImage(dir: string, sizeBytes: number): Promise<{ path: string; format: 'qcow2' }> {
  const path = join(dir, 'blank.qcow2');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(sizeBytes)]);
  return { path, format: 'qcow2' };
}
