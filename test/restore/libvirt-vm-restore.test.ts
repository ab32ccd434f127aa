// Issue 13 parts 2, 3 and 5 for a libvirt source: `restore vm` defines and starts a new domain beside the
// original (new name, UUID, MACs, its own console files) on the backed-up disk; instant recovery and boot
// verification run the domain's restore point under plain QEMU from the captured domain XML.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { exec } from '../../src/core/exec.ts';
import { sleep } from '../../src/core/owned-process.ts';
import { Virsh } from '../../src/hypervisor/libvirt/virsh.ts';
import { parseDomainXml } from '../../src/hypervisor/libvirt/libvirt-xml.ts';
import { readGuestConsole } from '../../src/lab/guest-console.ts';
import { sendGuestControl } from '../../src/lab/guest-control.ts';
import { parseGuestConsole } from '../../src/lab/index.ts';
import { LabDomain, labGuestBoot } from '../../src/lab/lab-libvirt-domain.ts';
import { LabLibvirt } from '../../src/lab/lab-libvirt.ts';
import { useSharedTestCache, withLab } from '../../src/lab/with-lab.ts';
import { initRepository } from '../../src/repository/index.ts';
import { makeWorkspace, md5OfImage, runCli } from '../support/workspace.ts';

const MiB = 1024 * 1024;
const password = 'libvirt-restore';
const missing = ['/usr/sbin/libvirtd', '/usr/sbin/virtlogd', '/usr/bin/virsh'].filter((program) => !existsSync(program));
const skip = process.getuid?.() !== 0 ? 'needs root (a privileged libvirtd)' : missing.length > 0 ? `libvirt is not installed (${missing.join(', ')})` : false;
// Datastores first: the lab libvirtd runs in its own mount namespace, which sees only what was mounted before.
const lab = skip ? () => undefined as never : withLab();

describe('a libvirt domain restored as a new domain, recovered instantly, verified to boot', { skip }, () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let libvirt: LabLibvirt | undefined;
  let virsh: Virsh;
  let source: LabDomain | undefined;
  const env = () => ({ SNAPSHIFT_HOME: join(workspace.dir, 'home'), SNAPSHIFT_PASSWORD: password, SNAPSHIFT_REPOSITORY: join(workspace.dir, 'repo') });
  const cli = async (args: string[]) => {
    const result = await runCli(args, env());
    assert.equal(result.status, 0, `snapshift ${args.join(' ')}: ${result.stderr}`);
    return result.stdout;
  };
  const waitForConsole = async (path: string, what: RegExp, timeoutMs: number) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = await readGuestConsole(path);
      if (what.test(text)) return text;
      if (Date.now() > deadline) assert.fail(`no ${what} on ${path} within ${timeoutMs} ms; console: ${text.slice(-300)}`);
      await sleep(200);
    }
  };

  before(async () => {
    workspace = await makeWorkspace('lv-restore');
    await mkdir(join(workspace.dir, 'home'));
    const diskPath = join(lab().datastore('btrfs').vmDisksDir, 'lv-src.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', diskPath, String(256 * MiB)]);
    await exec('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 8M 16M', diskPath]);
    libvirt = await LabLibvirt.start({ dir: join(workspace.dir, 'libvirt') });
    virsh = new Virsh(libvirt.uri);
    source = await LabDomain.start(virsh, { name: 'lv-src', disks: [{ path: diskPath, format: 'qcow2' }], runDir: join(workspace.dir, 'src'), guest: await labGuestBoot(useSharedTestCache()), rateMiBps: 1 });
    await source.waitForHeartbeats(2);
    await initRepository(join(workspace.dir, 'repo'), { password, encryption: true });
    await cli(['host', 'add', 'libvirt', '--uri', libvirt.uri, '--name', 'lab-libvirt']);
    await cli(['backup', 'lv-src', '--mode', 'storage-snapshot', '--json']);
  });
  after(async () => {
    for (const name of ['lv-copy']) await virsh?.run(['destroy', name]).catch(() => undefined);
    for (const name of ['lv-copy']) await virsh?.run(['undefine', name]).catch(() => undefined);
    await source?.destroy().catch(() => undefined);
    if (libvirt) await LabLibvirt.stopIn(libvirt.dir);
    await workspace?.cleanup();
  });

  test('restore vm --name --start: a new domain (new UUID and files) runs on the backed-up disk while the original runs', async () => {
    const datastore = join(workspace.dir, 'datastore');
    await mkdir(datastore);
    const restored = JSON.parse(await cli(['restore', 'vm', 'lv-src', '--to-datastore', datastore, '--name', 'lv-copy', '--start', '--json', '--quiet'])) as {
      kind: string;
      uuid: string;
      folder: string;
      disks: Array<{ path: string }>;
      started: boolean;
    };
    assert.equal(restored.kind, 'libvirt');
    assert.equal(restored.started, true);
    assert.ok(await source!.isRunning(), 'the original still runs');
    const copy = parseDomainXml(await virsh.run(['dumpxml', 'lv-copy']));
    assert.notEqual(copy.uuid, source!.uuid, 'a new UUID beside the original');
    assert.equal(copy.uuid, restored.uuid);
    assert.deepEqual(copy.disks.map((disk) => disk.path), [restored.disks[0]!.path]);
    const consoleLog = join(restored.folder, 'serial0.log');
    await waitForConsole(consoleLog, /LAB: HB /, 60_000);
    await sendGuestControl(join(restored.folder, 'serial1.sock'), 'STOP');
    const text = await waitForConsole(consoleLog, /LAB: MD5 /, 120_000);
    const deadline = Date.now() + 60_000;
    while ((await virsh.listDomains()).some((domain) => domain.name === 'lv-copy' && domain.state === 'running') && Date.now() < deadline) await sleep(200);
    const md5 = parseGuestConsole(text).find((event) => event.kind === 'md5');
    assert.equal(md5?.kind === 'md5' ? md5.md5 : '', await md5OfImage(restored.disks[0]!.path, 'qcow2', workspace.dir), 'the guest ran on the restored disk');
    const vms = JSON.parse(await cli(['vm', 'list', '--json'])) as Array<{ name: string; hostName?: string; host?: string }>;
    assert.ok(vms.some((vm) => vm.name === 'lv-copy'), 'the restored domain is registered');
  });

  test('instant recovery and verify-boot run the domain\'s restore point under QEMU from its captured XML', async () => {
    const recovery = JSON.parse(await cli(['instant-recovery', 'start', 'lv-src', '--name', 'lv-ir', '--json'])) as { consoleLog: string; disks: Array<{ sizeBytes: number }> };
    try {
      await waitForConsole(recovery.consoleLog, /LAB: HB /, 60_000);
      assert.equal(recovery.disks[0]!.sizeBytes, 256 * MiB);
    } finally {
      await cli(['instant-recovery', 'stop', 'lv-ir']);
    }
    const verdict = JSON.parse(await cli(['verify-boot', 'lv-src', '--marker', 'LAB: WORKLOAD_START', '--timeout', '120', '--json'])) as { passed: boolean };
    assert.equal(verdict.passed, true);
  });
});
