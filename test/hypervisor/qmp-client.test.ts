import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { QmpClient, qmpErrorClass, type QmpEvent } from '../../src/hypervisor/qemu/qmp-client.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { hasCode } from '../support/assertions.ts';


/** A unix-socket server that is not QEMU, or a fake QEMU that misbehaves on purpose. */
async function fakeServer(path: string, onConnection: (socket: Socket) => void): Promise<Server> {
  const server = createServer(onConnection);
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return server;
}

const greeting = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}\n';

describe('QmpClient against qemu-storage-daemon', () => {
  let dir: string;
  let daemon: StorageDaemon;
  let qmp: QmpClient;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'snapshift-qmp-'));
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk.qcow2'), '64M']);
    daemon = await StorageDaemon.start({ dir, images: [{ path: join(dir, 'disk.qcow2'), format: 'qcow2' }] });
    qmp = await QmpClient.connect(daemon.qmpSocketPath, { timeoutMs: 5_000 });
  });

  after(async () => {
    await qmp?.close();
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  test('reads the greeting and answers query-version with the same version', async () => {
    assert.ok(qmp.version.major >= 7, JSON.stringify(qmp.version));
    const reply = await qmp.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version');
    assert.deepEqual(reply.qemu, { major: qmp.version.major, minor: qmp.version.minor, micro: qmp.version.micro });
  });

  test('many commands in flight are matched to their replies by id', async () => {
    const replies = await Promise.all(
      Array.from({ length: 40 }, (_, i) => (i % 2 === 0 ? qmp.execute('query-version') : qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true }))),
    );
    replies.forEach((reply, i) => {
      if (i % 2 === 0) assert.ok('qemu' in (reply as object));
      else assert.ok((reply as Array<{ 'node-name': string }>).some((node) => node['node-name'] === 'disk0'));
    });
  });

  test('a failing command rejects with QMP_COMMAND_FAILED carrying the QMP class and description', async () => {
    await assert.rejects(qmp.execute('no-such-command'), hasCode('QMP_COMMAND_FAILED', /no-such-command failed: CommandNotFound/));
    const failure = await qmp.execute('block-dirty-bitmap-add', { node: 'nowhere', name: 'bm' }).catch((error: unknown) => error);
    assert.equal(qmpErrorClass(failure), 'GenericError');
    assert.match((failure as Error).message, /nowhere/);
    // The connection is still good afterwards.
    await qmp.execute('query-version');
  });

  test('a second NBD server is refused: the daemon already runs one', async () => {
    await assert.rejects(
      qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, 'other.sock') } } }),
      hasCode('QMP_COMMAND_FAILED', /NBD server already running/),
    );
  });

  test('block-commit: BLOCK_JOB_READY and BLOCK_JOB_COMPLETED arrive to waiters armed before the command', async () => {
    const seen: QmpEvent[] = [];
    const listener = (event: QmpEvent) => seen.push(event);
    qmp.on('event', listener);
    try {
      const overlay = join(dir, 'overlay.qcow2');
      await qmp.execute('blockdev-snapshot-sync', { 'node-name': 'disk0', 'snapshot-file': overlay, 'snapshot-node-name': 'overlay0', format: 'qcow2' });
      const ready = qmp.waitForEvent('BLOCK_JOB_READY', (event) => event.data['device'] === 'commit0', { timeoutMs: 10_000 });
      const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', (event) => event.data['device'] === 'commit0', { timeoutMs: 10_000 });
      await qmp.execute('block-commit', { 'job-id': 'commit0', device: 'overlay0', 'base-node': 'disk0' });
      // The event may well have arrived already; the waiter was armed before the command.
      await new Promise((resolve) => setTimeout(resolve, 50));
      const readyEvent = await ready;
      assert.equal(readyEvent.data['type'], 'commit');
      await qmp.execute('block-job-complete', { device: 'commit0' });
      const done = await completed;
      assert.equal(done.data['error'], undefined);
      assert.ok(done.timestamp && done.timestamp.seconds > 0);
      assert.ok(seen.some((event) => event.event === 'JOB_STATUS_CHANGE'), 'listeners see every event');
      const nodes = await qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
      assert.ok(!nodes.some((node) => node['node-name'] === 'overlay0'), 'the overlay is gone after the commit');
      await rm(overlay, { force: true });
    } finally {
      qmp.off('event', listener);
    }
  });

  test('an event that never comes times out with QMP_TIMEOUT', async () => {
    await assert.rejects(qmp.waitForEvent('NEVER_HAPPENS', undefined, { timeoutMs: 100 }), hasCode('QMP_TIMEOUT', /NEVER_HAPPENS/));
  });

  test('a second client of a busy QMP socket gets QMP_NOT_QEMU naming the likely cause', async () => {
    await assert.rejects(QmpClient.connect(daemon.qmpSocketPath, { timeoutMs: 300 }), hasCode('QMP_NOT_QEMU', /another client/));
  });
});

describe('QmpClient failures', () => {
  let dir: string;
  const servers: Server[] = [];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'snapshift-qmp-fail-'));
  });

  after(async () => {
    for (const server of servers) server.close();
    await rm(dir, { recursive: true, force: true });
  });

  test('a missing socket is QMP_CONNECT_FAILED', async () => {
    await assert.rejects(QmpClient.connect(join(dir, 'missing.sock'), { timeoutMs: 1_000 }), hasCode('QMP_CONNECT_FAILED', /no such socket/));
  });

  test('a stale socket nobody listens on is QMP_CONNECT_FAILED', async () => {
    const path = join(dir, 'stale.sock');
    const server = await fakeServer(path, () => undefined);
    // Closing a listening server removes its socket file; recreate a file there that refuses connections.
    await new Promise((resolve) => server.close(resolve));
    await writeFile(path, '');
    await assert.rejects(QmpClient.connect(path, { timeoutMs: 1_000 }), hasCode('QMP_CONNECT_FAILED'));
  });

  test('a server that says something else is QMP_NOT_QEMU at once', async () => {
    const path = join(dir, 'ssh.sock');
    servers.push(await fakeServer(path, (socket) => socket.write('SSH-2.0-OpenSSH_9.2\r\n')));
    const started = Date.now();
    await assert.rejects(QmpClient.connect(path, { timeoutMs: 5_000 }), hasCode('QMP_NOT_QEMU', /SSH-2.0/));
    assert.ok(Date.now() - started < 2_000);
  });

  test('a server that says nothing is QMP_NOT_QEMU after the timeout', async () => {
    const path = join(dir, 'silent.sock');
    servers.push(await fakeServer(path, () => undefined));
    await assert.rejects(QmpClient.connect(path, { timeoutMs: 200 }), hasCode('QMP_NOT_QEMU', /no QMP greeting within/));
  });

  test('a server that hangs up at once is QMP_NOT_QEMU', async () => {
    const path = join(dir, 'hangup.sock');
    servers.push(await fakeServer(path, (socket) => socket.end()));
    await assert.rejects(QmpClient.connect(path, { timeoutMs: 2_000 }), hasCode('QMP_NOT_QEMU', /closed the connection/));
  });

  test('a command without an answer is QMP_TIMEOUT; the socket gone mid-command is QMP_DISCONNECTED', async () => {
    const path = join(dir, 'fake-qemu.sock');
    let peer: Socket | undefined;
    servers.push(
      await fakeServer(path, (socket) => {
        peer = socket;
        socket.write(greeting);
        socket.setEncoding('utf8');
        socket.on('data', (text: string) => {
          for (const line of text.split('\n').filter(Boolean)) {
            const message = JSON.parse(line) as { execute: string; id: number };
            if (message.execute === 'qmp_capabilities') socket.write(`${JSON.stringify({ return: {}, id: message.id })}\n`);
            // Everything else: silence.
          }
        });
      }),
    );
    const client = await QmpClient.connect(path, { timeoutMs: 2_000 });
    assert.equal(client.version.package, 'fake');
    await assert.rejects(client.execute('query-status', undefined, { timeoutMs: 100 }), hasCode('QMP_TIMEOUT', /query-status/));
    const pending = client.execute('query-block', undefined, { timeoutMs: 10_000 });
    const waiting = client.waitForEvent('SHUTDOWN', undefined, { timeoutMs: 10_000 });
    peer!.destroy();
    await assert.rejects(pending, hasCode('QMP_DISCONNECTED', /query-block/));
    await assert.rejects(waiting, hasCode('QMP_DISCONNECTED', /SHUTDOWN/));
    await assert.rejects(client.execute('query-version'), hasCode('QMP_DISCONNECTED'));
    assert.equal(client.connected, false);
    await client.close();
  });

  test('qemu-storage-daemon killed mid-wait rejects the waiter with QMP_DISCONNECTED', async () => {
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'doomed.qcow2'), '16M']);
    const daemon = await StorageDaemon.start({ dir, images: [{ path: join(dir, 'doomed.qcow2'), format: 'qcow2' }] });
    try {
      await using client = await QmpClient.connect(daemon.qmpSocketPath);
      const waiting = client.waitForEvent('BLOCK_JOB_COMPLETED', undefined, { timeoutMs: 10_000 });
      await daemon.kill();
      await assert.rejects(waiting, hasCode('QMP_DISCONNECTED'));
    } finally {
      await daemon.kill();
    }
  });
});
