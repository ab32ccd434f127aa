import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { GuestAgent } from '../../src/hypervisor/qemu/guest-agent.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { guestWrite, snapshiftNodesOf } from '../support/guest-io.ts';
import { makeWorkspace } from '../support/workspace.ts';

// A real qemu-ga, run on the host on a unix socket. Freezing is blocked (-b): it would freeze the host's
// own file systems. That is what lets us test the agent protocol and the failure path of quiescing here.
describe('quiescing through the QEMU guest agent', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let agentProcess: ChildProcess;
  let daemon: StorageDaemon;
  let catalog: Catalog;
  const agentSocket = () => join(workspace.dir, 'qga.sock');

  before(async () => {
    workspace = await makeWorkspace('qga');
    agentProcess = spawn('qemu-ga', ['-m', 'unix-listen', '-p', agentSocket(), '-t', workspace.dir, '-b', 'guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw'], { stdio: 'ignore' });
    for (let attempt = 0; attempt < 100 && !existsSync(agentSocket()); attempt++) await new Promise((resolve) => setTimeout(resolve, 20));
    const image = join(workspace.dir, 'qga-vm.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(8 * 1024 * 1024)]);
    mkdirSync(join(workspace.dir, 'vm'));
    daemon = await StorageDaemon.start({ dir: join(workspace.dir, 'vm'), images: [{ path: image, format: 'qcow2', nodeName: 'disk0' }] });
    await guestWrite(daemon, 0, Buffer.alloc(1024 * 1024, 7));
    mkdirSync(join(workspace.dir, 'home'));
    catalog = Catalog.open(join(workspace.dir, 'home'));
    await initRepository(join(workspace.dir, 'repo'), { encryption: false });
  });

  after(async () => {
    catalog?.close();
    await daemon?.stop();
    if (agentProcess && agentProcess.exitCode === null) {
      const exited = new Promise((resolve) => agentProcess.once('exit', resolve));
      agentProcess.kill('SIGTERM');
      await exited;
    }
    await workspace?.cleanup();
  });

  test('the client syncs with a real qemu-ga and runs commands; a refused command is a clear error', async () => {
    await using agent = await GuestAgent.connect(agentSocket());
    assert.deepEqual(await agent.execute('guest-ping'), {});
    const info = await agent.execute<{ version: string }>('guest-info');
    assert.match(info.version, /^\d+\.\d+/);
    await assert.rejects(agent.execute('guest-fsfreeze-freeze'), /guest agent: guest-fsfreeze-freeze failed: .*disabled/i);
  });

  test('--quiesce without a guest agent: the backup runs crash-consistent and says so', async () => {
    catalog.addHost({ name: 'no-agent', kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath });
    await using repository = await openRepository(join(workspace.dir, 'repo'), {});
    const run = await runBackup({ vms: [catalog.getVm('no-agent')!], mode: 'regular', repository, catalog, runDir: join(workspace.dir, 'home', 'run'), quiesce: true });
    assert.equal(run.outcomes[0]!.error, undefined);
    assert.match(run.outcomes[0]!.result!.stats.quiesce ?? '', /^not quiesced: the VM has no guest agent configured/);
  });

  test('a guest agent that refuses to freeze: the backup fails with the reason, the VM untouched', async () => {
    catalog.addHost({ name: 'frozen-refused', kind: 'qemu', qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath, qgaSocketPath: agentSocket() });
    await using repository = await openRepository(join(workspace.dir, 'repo'), {});
    const run = await runBackup({ vms: [catalog.getVm('frozen-refused')!], mode: 'regular', repository, catalog, runDir: join(workspace.dir, 'home', 'run'), quiesce: true });
    assert.match(run.outcomes[0]!.error?.message ?? '', /guest-fsfreeze-freeze failed/);
    assert.deepEqual(await snapshiftNodesOf(daemon), []);
    assert.deepEqual(readdirSync(workspace.dir).filter((name) => /-\d{5}\.qcow2$/.test(name)), []);
    assert.deepEqual(catalog.listVmSnapshotLedger(), []);
  });
});
