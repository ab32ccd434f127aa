// backup and job run through bin/snapshift on a guest-less disk (qemu-storage-daemon: QMP, NBD and dirty
// bitmaps as in a VM): the default mode fails over with its reason on one line, an unchanged incremental names
// no bottleneck, and `job run --full` reads every disk in full (issue 11).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { oneLine } from '../../src/cli/format.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { initRepository } from '../../src/repository/index.ts';
import { locateImage } from '../../src/storage/registry.ts';
import { makeWorkspace, runCli } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const password = 'job-run';

interface JobRunJson {
  state: string;
  summary: { bottleneck: string | null };
  tasks: Array<{ vmName: string; state: string; reason?: string; stats?: { bottleneck: string; readBytes: number; disks: Array<{ cbtSource: string; fallbackReason: string | null; readBytes: number }> } }>;
}

describe('backup and job run on a guest-less disk', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let daemon: StorageDaemon | undefined;
  let imagePath: string;
  const repoPath = () => join(workspace.dir, 'repo');
  const env = () => ({ SNAPSHIFT_HOME: join(workspace.dir, 'home'), SNAPSHIFT_PASSWORD: password });

  before(async () => {
    workspace = await makeWorkspace('cli-run');
    const vmDir = join(workspace.dir, 'vm1');
    await mkdir(vmDir);
    imagePath = join(vmDir, 'vm1.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', imagePath, String(32 * MiB)]);
    daemon = await StorageDaemon.start({ dir: vmDir, images: [{ path: imagePath, format: 'qcow2', nodeName: 'disk0' }] });
    {
      await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: 'disk0' });
      await nbd.write(MiB, Buffer.alloc(4 * MiB, 'guest data '));
      await nbd.flush();
    }
    await initRepository(repoPath(), { password, encryption: true });
    const added = await runCli(['host', 'add', 'qemu', '--qmp', daemon.qmpSocketPath, '--nbd-socket', daemon.nbdSocketPath, '--name', 'vm1'], env());
    assert.equal(added.status, 0, added.stderr);
  });
  after(async () => {
    await daemon?.stop();
    await workspace?.cleanup();
  });

  test('backup without --mode takes the storage-snapshot path and fails over to regular, the reason on one line', async (t) => {
    if (await locateImage(imagePath)) return t.skip(`${imagePath} is on a storage system snapshift can snapshot: no failover to show`);
    const result = await runCli(['backup', 'vm1', '--repo', repoPath(), '--quiet'], env());
    assert.equal(result.status, 1, `a failover is a warning: ${result.stdout}${result.stderr}`);
    const lines = result.stdout.split('\n');
    const at = lines.findIndex((line) => line.startsWith('  failover to regular mode: '));
    assert.ok(at > 0, result.stdout);
    assert.match(lines[at]!, /^ {2}failover to regular mode: disk disk0 \(.*vm1\.qcow2\) is on no storage system snapshift can snapshot$/);
    assert.match(lines[at + 1]!, /^ {2}mode +regular$/, 'the summary follows at once: no stray blank line');
  });

  test('job run: an unchanged incremental names no bottleneck; --full reads the disk in full', async () => {
    const created = await runCli(['job', 'create', 'inc', '--vm', 'vm1', '--repo', repoPath(), '--mode', 'regular'], env());
    assert.equal(created.status, 0, created.stderr);
    const run = async (...extra: string[]): Promise<JobRunJson> => {
      const result = await runCli(['job', 'run', 'inc', '--json', ...extra], env());
      assert.equal(result.status, 0, `job run ${extra.join(' ')}: ${result.stdout}${result.stderr}`);
      return JSON.parse(result.stdout) as JobRunJson;
    };
    await run(); // the chain starts (or continues from the backup above)

    const unchanged = await run();
    const stats = unchanged.tasks[0]!.stats!;
    assert.notEqual(stats.disks[0]!.cbtSource, 'none', 'an incremental');
    assert.equal(stats.readBytes, 0, 'nothing changed, nothing read');
    assert.equal(stats.bottleneck, 'none');
    assert.equal(unchanged.summary.bottleneck, 'none');
    const human = await runCli(['job', 'run', 'inc', '--quiet'], env());
    assert.equal(human.status, 0, human.stderr);
    assert.match(human.stdout, /^ {2}bottleneck +none$/m);

    const full = await run('--full');
    const disk = full.tasks[0]!.stats!.disks[0]!;
    assert.equal(disk.cbtSource, 'none');
    assert.equal(disk.fallbackReason, 'a full read was asked for (--full)');
    assert.ok(disk.readBytes >= 4 * MiB, `read ${disk.readBytes} bytes in full`);

    const after = await run();
    assert.notEqual(after.tasks[0]!.stats!.disks[0]!.cbtSource, 'none', 'the next run is incremental again');
  });
});

// A storage command that fails without printing anything (btrfs, zfs, rbd, cp --reflink …) becomes the failover
// reason: Node's own "Command failed: …\n" used to end it with a newline, a stray blank line in the output.
test('a program that fails silently gives a one-line reason: how it ended, no trailing newline', async () => {
  await assert.rejects(exec('false', []), { code: 'COMMAND_FAILED', message: 'false failed: exit status 1, no output' });
  await assert.rejects(exec('sleep', ['5'], { timeoutMs: 100 }), { message: 'sleep 5 failed: no output; ended by SIGTERM after the 100 ms timeout' });
  await assert.rejects(exec('sh', ['-c', 'printf "first\\nlast words\\n\\n" >&2; exit 3']), { message: /failed: last words$/ });
  assert.equal(oneLine('storage snapshot failed: Command failed: btrfs subvolume snapshot\n'), 'storage snapshot failed: Command failed: btrfs subvolume snapshot');
});
