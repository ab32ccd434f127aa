// Our NBD server against reference clients (libnbd's nbdinfo and nbdcopy, qemu-img) and our own client:
// hash-equal reads, zero chunks as holes in block status, bad requests, a client gone mid-read, many
// clients at once, and close ending every connection (issue 13).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { createConnection, type Socket } from 'node:net';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { pathExists } from '../../src/core/fs-probe.ts';
import { NbdClient, NbdServer, allocationFlag, type ExportExtent, type ExportPiece, type NbdExportSource } from '../../src/datamover/nbd/index.ts';
import { makeWorkspace } from '../support/workspace.ts';

const KiB = 1024;
const chunkBytes = 64 * KiB;

/** A disk in memory, with chunks of zeros the source reports as holes; `delayMs` slows every read. */
class BufferSource implements NbdExportSource {
  readonly description: string;
  readonly sizeBytes: number;
  readonly preferredBlockBytes = chunkBytes;
  readsAborted = 0;
  delayMs = 0;
  constructor(
    readonly name: string,
    readonly data: Buffer,
    readonly zeroChunks: ReadonlySet<number>,
  ) {
    this.sizeBytes = data.length;
    this.description = `test disk ${name}`;
  }
  async read(offsetBytes: number, lengthBytes: number, signal: AbortSignal): Promise<ExportPiece[]> {
    if (this.delayMs > 0) {
      await new Promise((resolve) => setTimeout(resolve, this.delayMs));
      if (signal.aborted) {
        this.readsAborted++;
        throw new Error('aborted');
      }
    }
    const pieces: ExportPiece[] = [];
    for (let at = offsetBytes; at < offsetBytes + lengthBytes; ) {
      const index = Math.floor(at / chunkBytes);
      const end = Math.min((index + 1) * chunkBytes, offsetBytes + lengthBytes);
      pieces.push(this.zeroChunks.has(index) ? { lengthBytes: end - at } : { lengthBytes: end - at, data: this.data.subarray(at, end) });
      at = end;
    }
    return pieces;
  }
  async extents(offsetBytes: number, lengthBytes: number): Promise<ExportExtent[]> {
    const extents: ExportExtent[] = [];
    for (let at = offsetBytes; at < offsetBytes + lengthBytes; ) {
      const index = Math.floor(at / chunkBytes);
      const end = Math.min((index + 1) * chunkBytes, offsetBytes + lengthBytes);
      extents.push({ lengthBytes: end - at, zero: this.zeroChunks.has(index) });
      at = end;
    }
    return extents;
  }
}

/** 64 chunks + 1000 bytes (an unaligned end); chunks 0-3, 10, 11 and every 7th are zero. */
function makeSource(name: string): BufferSource {
  const data = randomBytes(64 * chunkBytes + 1000);
  const zeroChunks = new Set<number>([0, 1, 2, 3, 10, 11]);
  for (let i = 14; i < 64; i += 7) zeroChunks.add(i);
  for (const index of zeroChunks) data.fill(0, index * chunkBytes, (index + 1) * chunkBytes);
  return new BufferSource(name, data, zeroChunks);
}

const md5 = (data: Buffer) => createHash('md5').update(data).digest('hex');

/** The map we expect from base:allocation: runs of zero (hole|zero) and data chunks. */
function expectedMap(source: BufferSource): Array<{ offset: number; length: number; zero: boolean }> {
  const map: Array<{ offset: number; length: number; zero: boolean }> = [];
  for (let at = 0; at < source.sizeBytes; at += chunkBytes) {
    const length = Math.min(chunkBytes, source.sizeBytes - at);
    const zero = source.zeroChunks.has(at / chunkBytes);
    const last = map.at(-1);
    if (last && last.zero === zero) last.length += length;
    else map.push({ offset: at, length, zero });
  }
  return map;
}

describe('our NBD server', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let server: NbdServer;
  const vda = makeSource('vda');
  const vdb = makeSource('vdb');
  const errors: string[] = [];
  const uri = (name: string) => server.uriOf(name);

  before(async () => {
    workspace = await makeWorkspace('nbd-server');
    server = await NbdServer.listen({ exports: [vda, vdb], socketPath: join(workspace.dir, 'nbd.sock'), tcp: { host: '127.0.0.1', port: 0 }, onError: (message) => errors.push(message) });
  });
  after(async () => {
    await server?.close();
    await workspace?.cleanup();
  });

  test('nbdinfo sees a read-only, multi-conn export with base:allocation, lists both exports, and maps zero chunks as holes', async () => {
    const { stdout } = await exec('nbdinfo', ['--json', uri('vda')]);
    const info = JSON.parse(stdout) as { protocol: string; exports: Array<Record<string, unknown>> };
    assert.equal(info.protocol, 'newstyle-fixed');
    const exported = info.exports[0]!;
    assert.equal(exported['export-size'], vda.sizeBytes);
    assert.equal(exported['is_read_only'], true);
    assert.equal(exported['can_multi_conn'], true);
    assert.equal(exported['can_df'], true);
    assert.deepEqual(exported['contexts'], ['base:allocation']);
    assert.equal(exported['description'], 'test disk vda');

    const listed = JSON.parse((await exec('nbdinfo', ['--list', '--json', uri('')])).stdout) as { exports: Array<{ 'export-name': string }> };
    assert.deepEqual(listed.exports.map((e) => e['export-name']), ['vda', 'vdb']);

    const map = JSON.parse((await exec('nbdinfo', ['--map', '--json', uri('vda')])).stdout) as Array<{ offset: number; length: number; type: number }>;
    assert.deepEqual(
      map.map((e) => ({ offset: e.offset, length: e.length, zero: e.type === (allocationFlag.hole | allocationFlag.zero) })),
      expectedMap(vda),
    );
    assert.ok(map.every((e) => e.type === 0 || e.type === 3), 'data is 0, zero chunks are hole|zero');
  });

  test('nbdcopy reads every export hash-equal, over one connection and over four (multi-conn), on the unix socket and TCP', async () => {
    for (const source of [vda, vdb]) {
      const out = join(workspace.dir, `${source.name}.raw`);
      await exec('nbdcopy', ['--connections=1', uri(source.name), out]);
      assert.equal(md5(await readAll(out)), md5(source.data));
      await exec('nbdcopy', ['--connections=4', '--requests=16', '--flush', uri(source.name), out]);
      assert.equal(md5(await readAll(out)), md5(source.data));
    }
    const tcp = server.tcpAddress!;
    const out = join(workspace.dir, 'tcp.raw');
    await exec('nbdcopy', [`nbd://${tcp.host}:${tcp.port}/vdb`, out]);
    assert.equal(md5(await readAll(out)), md5(vdb.data));
  });

  test('qemu-img converts the export to qcow2 bit for bit, and sees the zero chunks as zero', async () => {
    const qcow2 = join(workspace.dir, 'vda.qcow2');
    await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri('vda'), qcow2]);
    const raw = join(workspace.dir, 'vda-from-qcow2.raw');
    await exec('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2, raw]);
    // qcow2 rounds the virtual size up to 512 bytes: the tail is zeros.
    const restored = await readAll(raw);
    assert.equal(restored.length, Math.ceil(vda.sizeBytes / 512) * 512);
    assert.equal(md5(restored.subarray(0, vda.sizeBytes)), md5(vda.data));
    assert.ok(restored.subarray(vda.sizeBytes).every((byte) => byte === 0));
    const map = JSON.parse((await exec('qemu-img', ['map', '--output=json', '-f', 'raw', uri('vda')])).stdout) as Array<{ start: number; length: number; zero: boolean }>;
    const zeroBytes = map.filter((e) => e.zero).reduce((sum, e) => sum + Math.max(0, Math.min(e.start + e.length, vda.sizeBytes) - e.start), 0);
    assert.equal(zeroBytes, vda.zeroChunks.size * chunkBytes);
  });

  test('our client reads unaligned ranges (with and without DF) and walks the same extents', async () => {
    await using client = await NbdClient.connect({ socketPath: server.socketPath!, exportName: 'vdb', metaContexts: ['base:allocation'] });
    assert.equal(client.readOnly, true);
    assert.equal(client.sizeBytes, vdb.sizeBytes);
    for (const [offset, length] of [[0, 100], [3 * chunkBytes - 7, 2 * chunkBytes + 13], [vdb.sizeBytes - 1500, 1500], [10 * chunkBytes + 1, 5 * chunkBytes]] as const) {
      assert.ok((await client.read(offset, length)).equals(vdb.data.subarray(offset, offset + length)), `read ${offset}+${length}`);
      assert.ok((await client.read(offset, length, { dontFragment: true })).equals(vdb.data.subarray(offset, offset + length)), `DF read ${offset}+${length}`);
    }
    const extents = await client.blockStatus(0, vdb.sizeBytes, 'base:allocation');
    const merged: Array<{ offset: number; length: number; zero: boolean }> = [];
    for (const extent of extents) {
      const zero = extent.flags === (allocationFlag.hole | allocationFlag.zero);
      const last = merged.at(-1);
      if (last && last.zero === zero) last.length += extent.length;
      else merged.push({ offset: extent.offset, length: extent.length, zero });
    }
    assert.deepEqual(merged, expectedMap(vdb));
    await assert.rejects(NbdClient.connect({ socketPath: server.socketPath!, exportName: 'nope' }), (error: Error & { code?: string }) => error.code === 'NBD_EXPORT_NOT_FOUND' && /no export named "nope"/.test(error.message));
  });

  test('bad requests: EPERM on write (payload skipped, the connection stays in step), EINVAL out of range, for block status without a context and for unknown commands; bad magic hangs up', async () => {
    const raw = await RawClient.connect(server.socketPath!, 'vda');
    assert.equal(await raw.request(1, 0, 4096, Buffer.alloc(4096, 1)), 1, 'write: EPERM');
    assert.equal(await raw.request(4, 0, 4096), 1, 'trim: EPERM');
    assert.equal(await raw.request(6, 0, 4096), 1, 'write zeroes: EPERM');
    assert.equal(await raw.request(0, vda.sizeBytes - 10, 11), 22, 'read past the end: EINVAL');
    assert.equal(await raw.request(0, 2 ** 52, 1), 22, 'read far past the end: EINVAL');
    assert.equal(await raw.request(0, 0, 64 * 1024 * 1024), 22, 'read over the maximum payload: EINVAL');
    assert.equal(await raw.request(7, 0, 4096), 22, 'block status without a meta context: EINVAL');
    assert.equal(await raw.request(99, 0, 0), 22, 'unknown command: EINVAL');
    const offset = 20 * chunkBytes + 5;
    const { errno, data } = await raw.read(offset, 1000);
    assert.equal(errno, 0);
    assert.ok(data.equals(vda.data.subarray(offset, offset + 1000)), 'a read after the refusals still answers the right bytes');
    await raw.sendBadMagic();
    await raw.closed;
  });

  test('a client that drops mid-read does not disturb the server: its reads are abandoned, others go on', async () => {
    vda.delayMs = 100;
    try {
      const raw = await RawClient.connect(server.socketPath!, 'vda');
      for (let i = 0; i < 8; i++) raw.send(0, i * chunkBytes, chunkBytes);
      await new Promise((resolve) => setTimeout(resolve, 20));
      raw.socket.destroy();
      await waitFor(() => server.connectionCount === 0, 'the dropped connection is gone');
      await waitFor(() => vda.readsAborted > 0, 'the source saw the abort');
    } finally {
      vda.delayMs = 0;
    }
    await using client = await NbdClient.connect({ socketPath: server.socketPath!, exportName: 'vda' });
    assert.ok((await client.read(0, vda.sizeBytes)).equals(vda.data));
    assert.deepEqual(errors, [], 'a client going away is no server error');
  });

  test('24 clients at once, each with 16 reads in flight, all read hash-equal bytes', async () => {
    const clients = await Promise.all(Array.from({ length: 24 }, (_, i) => NbdClient.connect({ socketPath: server.socketPath!, exportName: i % 2 ? 'vdb' : 'vda', maxRequestBytes: 48 * KiB })));
    try {
      await Promise.all(clients.map(async (client, i) => {
        const source = i % 2 ? vdb : vda;
        const reads = Array.from({ length: 16 }, (_, n) => {
          const offset = Math.floor(((i * 16 + n) * 7919 * KiB) % (source.sizeBytes - 300 * KiB));
          return client.read(offset, 300 * KiB - n).then((data) => assert.ok(data.equals(source.data.subarray(offset, offset + data.length)), `client ${i} read ${n}`));
        });
        await Promise.all(reads);
        assert.equal(md5(await client.read(0, source.sizeBytes)), md5(source.data));
      }));
      assert.equal(server.connectionCount, 24);
    } finally {
      await Promise.all(clients.map((client) => client.close()));
    }
  });

  test('close ends every connection and removes the socket; a second server can then take the path', async () => {
    const socketPath = join(workspace.dir, 'closing.sock');
    const closing = await NbdServer.listen({ exports: [vda], socketPath });
    const clients = await Promise.all([1, 2, 3].map(() => NbdClient.connect({ socketPath, exportName: 'vda' })));
    assert.equal(closing.connectionCount, 3);
    await closing.close();
    for (const client of clients) await assert.rejects(client.read(0, 10), (error: Error & { code?: string }) => error.code === 'NBD_DISCONNECTED');
    assert.equal(await pathExists(socketPath), false);
    await using _again = await NbdServer.listen({ exports: [vda], socketPath });
    await assert.rejects(NbdServer.listen({ exports: [vda], socketPath }), (error: Error & { code?: string }) => error.code === 'NBD_SERVER_LISTEN_FAILED' && /another server listens there/.test(error.message));
    await using client = await NbdClient.connect({ socketPath, exportName: '' });
    assert.equal(client.sizeBytes, vda.sizeBytes, 'the default export is the first');
  });
});

async function readAll(path: string): Promise<Buffer> {
  const { readFile } = await import('node:fs/promises');
  return readFile(path);
}

async function waitFor(condition: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** A hand-rolled client speaking simple replies, to send what a well-behaved client never would. */
class RawClient {
  #buffered = Buffer.alloc(0);
  #wake: (() => void) | undefined;
  #cookie = 0;
  readonly closed: Promise<void>;
  private constructor(readonly socket: Socket) {
    socket.on('data', (bytes: Buffer) => {
      this.#buffered = Buffer.concat([this.#buffered, bytes]);
      this.#wake?.();
    });
    this.closed = new Promise((resolve) => socket.on('close', () => resolve()));
    socket.on('error', () => undefined);
  }

  static async connect(path: string, exportName: string): Promise<RawClient> {
    const socket = createConnection({ path });
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const client = new RawClient(socket);
    await client.#take(18); // NBDMAGIC, IHAVEOPT, flags
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(3); // fixed newstyle, no zeroes
    socket.write(flags);
    const name = Buffer.from(exportName);
    const header = Buffer.alloc(16);
    header.write('IHAVEOPT', 0, 'latin1');
    header.writeUInt32BE(1, 8); // NBD_OPT_EXPORT_NAME
    header.writeUInt32BE(name.length, 12);
    socket.write(Buffer.concat([header, name]));
    await client.#take(10); // size, transmission flags
    return client;
  }

  send(type: number, offset: number, length: number, payload?: Buffer): number {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt16BE(type, 6);
    header.writeUInt32BE(++this.#cookie, 12);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    this.socket.write(payload ? Buffer.concat([header, payload]) : header);
    return this.#cookie;
  }

  /** Sends a request with no data in its reply (or a refused read) and returns the error number. */
  async request(type: number, offset: number, length: number, payload?: Buffer): Promise<number> {
    const cookie = this.send(type, offset, length, payload);
    const reply = await this.#take(16);
    assert.equal(reply.readUInt32BE(0), 0x67446698, 'simple reply magic');
    assert.equal(reply.readUInt32BE(12), cookie);
    return reply.readUInt32BE(4);
  }

  async read(offset: number, length: number): Promise<{ errno: number; data: Buffer }> {
    const errno = await this.request(0, offset, length);
    return { errno, data: errno === 0 ? await this.#take(length) : Buffer.alloc(0) };
  }

  async sendBadMagic(): Promise<void> {
    this.socket.write(Buffer.alloc(28, 0xee));
  }

  async #take(length: number): Promise<Buffer> {
    while (this.#buffered.length < length) await new Promise<void>((resolve) => (this.#wake = resolve));
    const bytes = this.#buffered.subarray(0, length);
    this.#buffered = this.#buffered.subarray(length);
    return bytes;
  }
}
