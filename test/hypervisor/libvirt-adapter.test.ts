// The libvirt hypervisor adapter on the lab libvirtd, with the lab's tiny guest writing to its disk under TCG
// (and host-side pattern writes at known places): VM snapshot + frozen export + commit, CBT from checkpoints
// over several incrementals, fleecing, and the hunter after a SIGKILLed task.
// Needs root and libvirt-daemon-system + libvirt-daemon-driver-qemu + libvirt-clients.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Catalog, type HostRecord, type VmTarget } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { SnapshiftError } from '../../src/core/errors.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import type { Region } from '../../src/datamover/extent-map.ts';
import type { HypervisorVm, VmCbtPlan } from '../../src/hypervisor/hypervisor.ts';
import { libvirtHypervisor } from '../../src/hypervisor/libvirt/libvirt-hypervisor.ts';
import { pullBackupXml } from '../../src/hypervisor/libvirt/libvirt-xml.ts';
import { Virsh } from '../../src/hypervisor/libvirt/virsh.ts';
import { openVm } from '../../src/hypervisor/registry.ts';
import { LabDomain, labGuestBoot, type LabGuestBoot } from '../../src/lab/lab-libvirt-domain.ts';
import { LabLibvirt } from '../../src/lab/lab-libvirt.ts';
import { labFor, useSharedTestCache } from '../../src/lab/with-lab.ts';
import { runBackup } from '../../src/processing/backup-run.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import { vmSnapshotLedger } from '../../src/processing/regular-mode.ts';
import { huntOverlaysOnHosts, huntVmSnapshots } from '../../src/processing/snapshot-hunter.ts';
import { makeWorkspace, md5File, runCli } from '../support/workspace.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const diskSizeBytes = 32 * MiB;
const vmName = 'lva';
const uuid = '0c3f7a52-6d1e-4b8a-9f20-5e4d3c2b1a09';
const chainKey = '0123456789abcdef';
const missing = ['/usr/sbin/libvirtd', '/usr/sbin/virtlogd', '/usr/bin/virsh'].filter((program) => !existsSync(program));
const skip = process.getuid?.() !== 0 ? 'needs root (a privileged libvirtd)' : missing.length > 0 ? `libvirt is not installed (${missing.join(', ')})` : false;

const md5 = (data: Buffer): string => createHash('md5').update(data).digest('hex');
const newTag = (): { sessionId: string; tag: string } => {
  const sessionId = randomUUID();
  return { sessionId, tag: sessionId.slice(0, 8) };
};

async function readExport(socketPath: string, exportName: string): Promise<Buffer> {
  await using nbd = await NbdClient.connect({ socketPath, exportName });
  const image = Buffer.alloc(nbd.sizeBytes);
  for (let at = 0; at < nbd.sizeBytes; at += MiB) (await nbd.read(at, Math.min(MiB, nbd.sizeBytes - at))).copy(image, at);
  return image;
}

function codeOf(code: string): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof SnapshiftError, `a SnapshiftError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    return true;
  };
}

function covers(regions: readonly Region[], offset: number, length: number): boolean {
  return regions.some((region) => region.offset <= offset && region.offset + region.length >= offset + length);
}

describe('the libvirt hypervisor adapter, on the lab libvirtd', { skip }, () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let libvirt: LabLibvirt;
  let virsh: Virsh;
  let guest: LabGuestBoot;
  let domain: LabDomain;
  let catalog: Catalog;
  let host: HostRecord;
  let target: VmTarget;
  let vm: HypervisorVm;
  let runDir: string;
  const children: ChildProcess[] = [];
  const images = () => [join(workspace.dir, 'ds', `${vmName}-a.qcow2`), join(workspace.dir, 'ds', `${vmName}-b.qcow2`)];

  /** Pauses the guest and reads each disk as it is now (flushed through QEMU first, so the qcow2 files are current). */
  async function pauseAndReadDisks(): Promise<Buffer[]> {
    await virsh.run(['suspend', vmName]);
    for (const disk of await virsh.disks(vmName)) {
      await virsh.run(['qemu-monitor-command', vmName, '--hmp', `qemu-io -d /machine/peripheral/${disk.alias}/virtio-backend "flush"`]);
    }
    const contents: Buffer[] = [];
    for (const [index, image] of images().entries()) {
      const raw = join(workspace.dir, `reference-${index}.raw`);
      await exec('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
      contents.push(readFileSync(raw));
      await rm(raw);
    }
    return contents;
  }

  before(async () => {
    workspace = await makeWorkspace('lva');
    runDir = join(workspace.dir, 'run');
    mkdirSync(runDir);
    mkdirSync(join(workspace.dir, 'ds'));
    guest = await labGuestBoot(useSharedTestCache());
    for (const image of images()) await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(diskSizeBytes)]);
    libvirt = await LabLibvirt.start({ dir: join(workspace.dir, 'lv') });
    virsh = new Virsh(libvirt.uri);
    domain = await LabDomain.start(virsh, { name: vmName, uuid, disks: images().map((path) => ({ path })), runDir: join(workspace.dir, 'dom'), guest, guestAgent: true });
    mkdirSync(join(workspace.dir, 'home'));
    catalog = Catalog.open(join(workspace.dir, 'home'));
    host = catalog.addHost({ kind: 'libvirt', name: 'lab-libvirt', uri: libvirt.uri });
    catalog.addVm({ name: vmName, hostName: host.name, ref: vmName, uuid });
    target = catalog.getVm(vmName)!;
    vm = await openVm(target);
  });

  after(async () => {
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await vm?.[Symbol.asyncDispose]();
    catalog?.close();
    await domain?.destroy().catch(() => undefined);
    if (libvirt) await LabLibvirt.stopIn(libvirt.dir);
    await workspace?.cleanup();
  });

  test('listVms, openVm (UUID checked), listDisks from the live XML, the configuration as a definable XML, quiescing without an agent', async () => {
    assert.deepEqual(await libvirtHypervisor.listVms(host), [{ ref: vmName, uuid, state: 'running' }]);
    await assert.rejects(openVm({ ...target, uuid: '11111111-2222-4333-8444-555555555555' }), codeOf('VM_UUID_MISMATCH'));
    await assert.rejects(openVm({ ...target, ref: 'no-such-domain' }), codeOf('LIBVIRT_DOMAIN_UNKNOWN'));
    const disks = await vm.listDisks();
    assert.deepEqual(
      disks.map((disk) => ({ ...disk, actualSizeBytes: typeof disk.actualSizeBytes })),
      images().map((image, index) => ({ name: `vd${'ab'[index]}`, nodeName: `vd${'ab'[index]}`, imagePath: image, format: 'qcow2', protocol: 'file', virtualSizeBytes: diskSizeBytes, actualSizeBytes: 'number' })),
    );
    const configuration = await vm.captureConfiguration();
    assert.equal(configuration.kind, 'libvirt');
    assert.ok(configuration.kind === 'libvirt' && configuration.uuid === uuid && configuration.domainXml.includes(`<name>${vmName}</name>`));
    assert.ok(configuration.kind === 'libvirt' && !configuration.domainXml.includes('<alias'), 'no run-time aliases in the definition');
    await using quiet = await vm.prepareQuiesce(false);
    assert.equal(quiet.note, null);
    await using quiesce = await vm.prepareQuiesce(true);
    assert.equal(quiesce.quiesce, undefined);
    assert.match(quiesce.note ?? '', /^not quiesced: .*crash-consistent$/);
  });

  test('VM snapshot + frozen export + commit: the exports hold the snapshot instant bit for bit while the guest writes on; the commit keeps every write', async (t) => {
    await domain.waitForHeartbeats(1);
    const disks = await vm.listDisks();
    const { sessionId, tag } = newTag();
    const reference = await pauseAndReadDisks();
    const vmSnapshot = await vm.snapshot(disks, { tag, ledger: vmSnapshotLedger(catalog, target, sessionId) });
    await virsh.run(['resume', vmName]);
    try {
      const [row] = catalog.listVmSnapshotLedger(vmName);
      assert.deepEqual(row?.adapter, { kind: 'libvirt', operation: 'snapshot', uri: libvirt.uri, domain: vmName, domainUuid: uuid });
      assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), vmSnapshot.overlays.map((overlay) => overlay.overlayPath));
      assert.deepEqual(vmSnapshot.overlays.map((overlay) => overlay.overlayPath), images().map((image) => image.replace(/\.qcow2$/, '-00001.qcow2')));
      await domain.writePattern('vdb', 1 * MiB, 64 * KiB, 0x6c);
      const writesBefore = (await domain.heartbeats()).at(-1)!.writes;
      await domain.waitForHeartbeats((await domain.heartbeats()).length + 2);
      for (const [index, disk] of disks.entries()) {
        await using frozen = await vm.exportFrozenDisk(disk, index, { tag, runDir });
        assert.equal(md5(await readExport(frozen.socketPath, frozen.exportName)), md5(reference[index]!), `disk ${disk.name} read at the snapshot instant`);
      }
      assert.ok((await domain.heartbeats()).at(-1)!.writes > writesBefore, 'the guest wrote while the snapshot lived');
    } finally {
      const stats = await vmSnapshot.commit();
      t.diagnostic(`snapshot lifetime ${Math.round(stats.lifetimeMs)} ms, delta ${(stats.deltaBytesAtCommit / MiB).toFixed(1)} MiB, commit ${Math.round(stats.commitMs)} ms (2 disks)`);
    }
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => [disk.path, disk.backingChain.length]), images().map((image) => [image, 0]));
    assert.deepEqual(vmSnapshot.overlays.filter((overlay) => existsSync(overlay.overlayPath)), [], 'overlay files removed');
    assert.deepEqual(catalog.listVmSnapshotLedger(vmName), [], 'ledger row cleared');
    // The host-side write made on the overlay is in the base now.
    const after = await pauseAndReadDisks();
    await virsh.run(['resume', vmName]);
    assert.ok(after[1]!.subarray(1 * MiB, 1 * MiB + 64 * KiB).every((byte) => byte === 0x6c));
    // A disposal commits too (a failed backup still commits); a second commit is a no-op.
    {
      await using disposed = await vm.snapshot(disks, { tag: newTag().tag, ledger: vmSnapshotLedger(catalog, target, sessionId) });
      assert.equal(disposed.committed, false);
    }
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), images());
  });

  // Restore points of a chain, as the repository would hand them to the plan: the last one's record.
  let latest: { id: string; extra: Record<string, unknown> } | undefined;
  /** Each disk as the chain so far restores it. */
  let restored: Buffer[] = [];

  /** One regular-mode backup through the adapter: plan, snapshot, read (changed regions only when planned), commit, finish. */
  async function backupOnce(options: { succeed?: boolean; full?: boolean; marks?: Array<[disk: 'vda' | 'vdb', offset: number, pattern: number]> } = {}) {
    const disks = await vm.listDisks();
    const { sessionId, tag } = newTag();
    for (const [disk, offset, pattern] of options.marks ?? []) await domain.writePattern(disk, offset, 64 * KiB, pattern);
    const plan: VmCbtPlan = await vm.planChangedBlocks(disks, { latest, chainKey, tag, runDir, ...(options.full ? { full: true } : {}) });
    const reference = await pauseAndReadDisks();
    const vmSnapshot = await vm.snapshot(disks, { tag, ledger: vmSnapshotLedger(catalog, target, sessionId), cbt: plan });
    await virsh.run(['resume', vmName]);
    // Written after the snapshot: not in this restore point, but in the next one's changes.
    await domain.writePattern('vdb', 20 * MiB, 64 * KiB, 0x20 + (restored.length % 16));
    const result: Array<{ plan: string; regions: Region[] | undefined; fallbackReason?: string }> = [];
    const images: Buffer[] = [];
    try {
      for (const [index, disk] of disks.entries()) {
        const readPlan = plan.readPlans.get(disk.name)!;
        await using frozen = await vm.exportFrozenDisk(disk, index, { tag, runDir });
        if (readPlan.kind === 'full') {
          images.push(await readExport(frozen.socketPath, frozen.exportName));
          result.push({ plan: 'full', regions: undefined, ...(readPlan.fallbackReason ? { fallbackReason: readPlan.fallbackReason } : {}) });
        } else {
          const regions = await readPlan.source.changedRegions();
          const image = Buffer.from(restored[index]!);
          await using nbd = await NbdClient.connect({ socketPath: frozen.socketPath, exportName: frozen.exportName });
          for (const region of regions) (await nbd.read(region.offset, region.length)).copy(image, region.offset);
          images.push(image);
          result.push({ plan: 'changed', regions });
        }
      }
    } finally {
      await vmSnapshot.commit();
    }
    if (options.succeed === false) {
      assert.deepEqual(await plan.finish(false), []);
      return { result, disks };
    }
    for (const [index, disk] of disks.entries()) assert.equal(md5(images[index]!), md5(reference[index]!), `disk ${disk.name} restores to the snapshot instant`);
    assert.deepEqual(await plan.finish(true), []);
    restored = images;
    latest = { id: `rp-${tag}`, extra: { cbt: JSON.parse(JSON.stringify(plan.record)) as unknown } };
    return { result, disks };
  }

  test('CBT from checkpoints: a full, three incrementals (one after a failed backup) restore bit for bit, and the changed regions cover every write since the previous backup', async (t) => {
    const first = await backupOnce();
    assert.deepEqual(first.result.map((disk) => disk.plan), ['full', 'full']);
    assert.deepEqual(first.result.map((disk) => disk.fallbackReason), [undefined, undefined], 'the first backup explains nothing');
    assert.deepEqual((await virsh.checkpointNames(vmName)).length, 1);

    const second = await backupOnce({ marks: [['vdb', 3 * MiB, 0x33]] });
    assert.deepEqual(second.result.map((disk) => disk.plan), ['changed', 'changed'], JSON.stringify(second.result.map((disk) => disk.fallbackReason)));
    const vdb = second.result[1]!.regions!;
    assert.ok(covers(vdb, 3 * MiB, 64 * KiB) && covers(vdb, 20 * MiB, 64 * KiB), 'vdb: the write before the backup and the one after the previous snapshot');
    assert.ok(vdb.reduce((sum, region) => sum + region.length, 0) <= 4 * 64 * KiB, `vdb: only what was written (${JSON.stringify(vdb)})`);
    t.diagnostic(`incremental 1: vda ${second.result[0]!.regions!.length} changed regions (the guest's own writes), vdb ${JSON.stringify(vdb)}`);

    // A backup that fails after its checkpoint was made: the checkpoint goes, its bitmap merges into the previous one.
    const failed = await backupOnce({ succeed: false, marks: [['vdb', 5 * MiB, 0x55]] });
    assert.deepEqual(failed.result.map((disk) => disk.plan), ['changed', 'changed']);
    assert.equal((await virsh.checkpointNames(vmName)).length, 1, 'the failed backup left no checkpoint');

    const third = await backupOnce({ marks: [['vdb', 7 * MiB, 0x77]] });
    const vdb3 = third.result[1]!.regions!;
    assert.ok([5, 7, 20].every((mib) => covers(vdb3, mib * MiB, 64 * KiB)), `after the failed backup, its writes are still covered (${JSON.stringify(vdb3)})`);

    const fourth = await backupOnce({ marks: [['vdb', 9 * MiB, 0x99]] });
    assert.ok(covers(fourth.result[1]!.regions!, 9 * MiB, 64 * KiB));
    assert.equal((await virsh.checkpointNames(vmName)).length, 1, 'one checkpoint per chain');

    // A transient domain's checkpoint metadata gone (as after a restart): redefined from the restore point's record.
    const [kept] = await virsh.checkpointNames(vmName);
    await virsh.checkpointDelete(vmName, kept!, { metadataOnly: true });
    const redefined = await backupOnce({ marks: [['vdb', 11 * MiB, 0xbb]] });
    assert.deepEqual(redefined.result.map((disk) => disk.plan), ['changed', 'changed']);
    assert.ok(covers(redefined.result[1]!.regions!, 11 * MiB, 64 * KiB));

    const full = await backupOnce({ full: true });
    assert.deepEqual(full.result.map((disk) => disk.fallbackReason), ['a full read was asked for (--full)', 'a full read was asked for (--full)']);
    const foreign = await vm.planChangedBlocks(await vm.listDisks(), { latest, chainKey: 'fedcba9876543210', tag: newTag().tag, runDir });
    assert.match((foreign.readPlans.get('vda') as { fallbackReason: string }).fallbackReason, /belongs to another repository's chain/);
    assert.deepEqual(await foreign.finish(false), []);
  });

  test('fleecing: libvirt exports the instant the job began while the guest writes on; with CBT the same job gives the changes; release aborts it and its scratch files go', async (t) => {
    const disks = await vm.listDisks();
    const { sessionId, tag } = newTag();
    await domain.writePattern('vdb', 13 * MiB, 64 * KiB, 0xdd);
    const plan = await vm.planChangedBlocks(disks, { latest, chainKey, tag, runDir });
    const reference = await pauseAndReadDisks();
    const fleece = await vm.startFleecing(disks, { tag, ledger: vmSnapshotLedger(catalog, target, sessionId), runDir, cbt: plan });
    await virsh.run(['resume', vmName]);
    let scratchPaths: string[] = [];
    try {
      const job = (await virsh.backupJob(vmName))!;
      scratchPaths = job.disks.map((disk) => disk.scratchPath!);
      assert.ok(scratchPaths.every((path) => path.includes(`-snapshift-${tag}-`)), 'scratch files carry the tag');
      assert.equal(catalog.listVmSnapshotLedger(vmName)[0]?.adapter?.['operation'], 'fleecing');
      await domain.writePattern('vdb', 13 * MiB, 64 * KiB, 0xee);
      await domain.waitForHeartbeats((await domain.heartbeats()).length + 2);
      for (const [index, disk] of disks.entries()) {
        await using diskExport = await fleece.exportDisk(disk, index);
        const image = await readExport(diskExport.socketPath, diskExport.exportName);
        assert.equal(md5(image), md5(reference[index]!), `disk ${disk.name} read at the fleecing instant`);
        const readPlan = plan.readPlans.get(disk.name)!;
        assert.equal(readPlan.kind, 'changed');
        const regions = readPlan.kind === 'changed' ? await readPlan.source.changedRegions() : [];
        const incremental = Buffer.from(restored[index]!);
        for (const region of regions) image.copy(incremental, region.offset, region.offset, region.offset + region.length);
        assert.equal(md5(incremental), md5(reference[index]!), `disk ${disk.name}: the previous restore point plus the changes is the fleecing instant`);
        if (disk.name === 'vdb') assert.ok(covers(regions, 13 * MiB, 64 * KiB));
      }
    } finally {
      const stats = await fleece.release();
      t.diagnostic(`fleecing lifetime ${Math.round(stats.lifetimeMs)} ms, scratch ${(stats.scratchBytes / KiB).toFixed(0)} KiB`);
      assert.ok(stats.scratchBytes > 0, 'the guest\'s writes copied old blocks aside');
    }
    assert.equal(await virsh.backupJob(vmName), undefined, 'the job is gone');
    assert.deepEqual(scratchPaths.filter((path) => existsSync(path)), [], 'scratch files gone');
    assert.deepEqual(catalog.listVmSnapshotLedger(vmName), []);
    assert.deepEqual(await plan.finish(true), []);
    assert.equal((await virsh.checkpointNames(vmName)).length, 1);
  });

  test('through runBackup: regular, regular incremental and fleecing incremental restore points of the libvirt VM restore to their instants', async (t) => {
    await initRepository(join(workspace.dir, 'repo'), { password: 'test-password', encryption: true });
    await using repository = await openRepository(join(workspace.dir, 'repo'), { password: 'test-password' });
    for (const [round, mode] of (['regular', 'regular', 'fleecing'] as const).entries()) {
      await domain.writePattern('vdb', (15 + round) * MiB, 64 * KiB, 0xa0 + round);
      let reference: Buffer[] = [];
      const run = await runBackup({
        vms: [catalog.getVm(vmName)!],
        mode,
        repository,
        catalog,
        runDir,
        hooks: {
          beforeVmSnapshots: async () => {
            reference = await pauseAndReadDisks();
          },
          afterVmSnapshots: () => virsh.run(['resume', vmName]).then(() => undefined),
        },
      });
      const outcome = run.outcomes[0]!;
      assert.equal(outcome.error, undefined, outcome.error?.stack);
      const { restorePoint, stats } = outcome.result!;
      t.diagnostic(`${mode} #${round + 1}: ${Math.round(stats.durationMs)} ms, read ${(stats.readBytes / MiB).toFixed(1)} MiB, cbt ${stats.disks.map((disk) => `${disk.name}=${disk.cbtSource}`).join(' ')}`);
      assert.deepEqual(stats.disks.map((disk) => disk.cbtSource), round === 0 ? ['none', 'none'] : ['bitmap', 'bitmap']);
      for (const [index, disk] of ['vda', 'vdb'].entries()) {
        const restored = join(workspace.dir, `restored-${disk}.raw`);
        const reader = await repository.openRestorePoint(restorePoint.id);
        await restoreDisk(reader, disk, restored, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
        assert.equal(await md5File(restored), md5(reference[index]!), `${mode} #${round + 1}: ${disk} restores to its instant`);
        await rm(restored);
      }
    }
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), images());
    assert.equal(await virsh.backupJob(vmName), undefined);
    assert.deepEqual(catalog.listVmSnapshotLedger(vmName), []);
  });

  /** Runs test/support/libvirt-child.ts until it says PAUSED, then SIGKILLs it (by its PID). */
  async function killedTask(what: 'snapshot' | 'fleecing'): Promise<string> {
    const child = spawn(process.execPath, ['--import', 'tsx', 'test/support/libvirt-child.ts', join(workspace.dir, 'home'), vmName, what, runDir], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let output = '';
    let errors = '';
    child.stderr!.on('data', (chunk: Buffer) => (errors += chunk.toString()));
    const sessionId = await new Promise<string>((resolve, reject) => {
      child.stdout!.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        const paused = /PAUSED (\S+)/.exec(output);
        if (paused) resolve(paused[1]!);
      });
      child.once('exit', (code) => reject(new Error(`the child exited (${code}) before pausing: ${errors}`)));
    });
    const exited = new Promise((resolve) => child.once('exit', resolve));
    process.kill(child.pid!, 'SIGKILL');
    await exited;
    return sessionId;
  }

  test('the hunter after a SIGKILLed task: mid-snapshot the overlays are committed live; mid-fleecing the job is aborted and its scratch files go; a leftover query job of no ledger row is found on the host', async () => {
    await killedTask('snapshot');
    const overlays = catalog.listVmSnapshotLedger(vmName)[0]!.overlays.map((overlay) => overlay.overlayPath);
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), overlays, 'the killed task left the guest on its overlays');
    assert.deepEqual((await huntVmSnapshots(catalog, { dryRun: true })).map((action) => action.action), ['committed-live', 'committed-live']);
    assert.deepEqual((await huntVmSnapshots(catalog)).map((action) => action.action), ['committed-live', 'committed-live']);
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), images());
    assert.deepEqual(overlays.filter((path) => existsSync(path)), []);
    assert.deepEqual(catalog.listVmSnapshotLedger(vmName), []);

    await killedTask('fleecing');
    const scratch = catalog.listVmSnapshotLedger(vmName)[0]!.overlays.map((overlay) => overlay.overlayPath);
    assert.ok(await virsh.backupJob(vmName), 'the killed task left its backup job running');
    assert.deepEqual((await huntVmSnapshots(catalog)).map((action) => action.action), ['removed-fleecing']);
    assert.equal(await virsh.backupJob(vmName), undefined);
    assert.deepEqual(scratch.filter((path) => existsSync(path)), []);
    assert.deepEqual(catalog.listVmSnapshotLedger(vmName), []);

    // A changed-block query job whose task died (no ledger row names it): the host hunt finds it by its socket name.
    const socketPath = join(runDir, 'snapshift-deadbeef-cbt.sock');
    await virsh.backupBegin(vmName, pullBackupXml({ socketPath, disks: [{ name: 'vdb', scratchPath: join(runDir, 'x-snapshift-deadbeef-vdb.scratch.qcow2') }], excludedDisks: ['vda'] }));
    const live = await libvirtHypervisor.huntHost(host, { dryRun: false, isLiveTag: (tag) => tag === 'deadbeef' });
    assert.deepEqual(live, [], 'a live session\'s job is not touched');
    assert.deepEqual((await huntOverlaysOnHosts(catalog)).map((action) => [action.action, action.overlayPath]), [['removed-export', socketPath]]);
    assert.equal(await virsh.backupJob(vmName), undefined);
    assert.ok(await domain.isRunning(), 'the guest ran through all of it');
  });

  test('the hunter: a commit job a dead task left running is finished and pivoted; the overlays of a domain that is gone are committed offline', async () => {
    const disks = await vm.listDisks();
    const { sessionId, tag } = newTag();
    const vmSnapshot = await vm.snapshot(disks, { tag, ledger: vmSnapshotLedger(catalog, target, sessionId) });
    await domain.writePattern('vdb', 24 * MiB, 4 * MiB, 0x4c);
    // As a task that died while waiting for its commits: the jobs run on, slowly, and nobody pivots them.
    for (const disk of ['vda', 'vdb']) await virsh.run(['blockcommit', vmName, disk, '--active', '--bandwidth', '1']);
    assert.ok(await virsh.blockJob(vmName, 'vdb'));
    const [row] = catalog.listVmSnapshotLedger(vmName);
    const actions = await huntVmSnapshots(catalog, { includeEntries: [row!.id] });
    assert.deepEqual(actions.map((action) => [action.action, action.detail.includes('finished the commit job')]), [['committed-live', true], ['committed-live', true]]);
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), images());
    assert.deepEqual(vmSnapshot.overlays.filter((overlay) => existsSync(overlay.overlayPath)), []);
    assert.deepEqual(catalog.listVmSnapshotLedger(vmName), []);

    const second = newTag();
    const left = await vm.snapshot(disks, { tag: second.tag, ledger: vmSnapshotLedger(catalog, target, second.sessionId) });
    await domain.writePattern('vdb', 28 * MiB, 64 * KiB, 0x5d);
    await domain.destroy();
    const [gone] = catalog.listVmSnapshotLedger(vmName);
    assert.deepEqual((await huntVmSnapshots(catalog, { includeEntries: [gone!.id] })).map((action) => action.action), ['committed-offline', 'committed-offline']);
    assert.deepEqual(left.overlays.filter((overlay) => existsSync(overlay.overlayPath)), []);
    const { stdout } = await exec('qemu-io', ['-f', 'qcow2', '-c', `read -P 0x5d ${28 * MiB} ${64 * KiB}`, images()[1]!]);
    assert.doesNotMatch(stdout, /Pattern verification failed/, 'the write made on the overlay is in the base');
    assert.deepEqual(catalog.listVmSnapshotLedger(vmName), []);
  });

  test('CBT across restarts: a checkpoint libvirt cannot start a job from (base committed offline, QEMU SIGKILLed) means a full read with the reason, and the next backup is incremental again', async (t) => {
    const start = () => LabDomain.start(virsh, { name: vmName, uuid, disks: images().map((path) => ({ path })), runDir: join(workspace.dir, 'dom'), guest, guestAgent: true });
    domain = await start();
    // The transient domain lost its checkpoint metadata (redefined from the record), and the base was written by
    // qemu-img commit while its bitmap was not recording: libvirt refuses the checkpoint.
    const afterOffline = await backupOnce({ marks: [['vdb', 30 * MiB, 0x31]] });
    assert.deepEqual(afterOffline.result.map((disk) => disk.plan), ['full', 'full']);
    assert.match(afterOffline.result[1]!.fallbackReason ?? '', /^checkpoint snapshift-0123456789abcdef-\w+ cannot be used \(.*(inconsistent|broken)/);
    t.diagnostic(`after the offline commit: ${afterOffline.result[1]!.fallbackReason}`);
    const recovered = await backupOnce({ marks: [['vdb', 30 * MiB, 0x32]] });
    assert.deepEqual(recovered.result.map((disk) => disk.plan), ['changed', 'changed']);
    assert.ok(covers(recovered.result[1]!.regions!, 30 * MiB, 64 * KiB));

    const qemuPid = Number(readFileSync(join(libvirt.dir, 'run', 'qemu', `${vmName}.pid`), 'utf8').trim());
    process.kill(qemuPid, 'SIGKILL');
    for (let i = 0; i < 100 && (await virsh.listDomains()).length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
    domain = await start();
    const afterKill = await backupOnce({ marks: [['vdb', 31 * MiB, 0x33]] });
    assert.deepEqual(afterKill.result.map((disk) => disk.plan), ['full', 'full']);
    t.diagnostic(`after QEMU was SIGKILLed: ${afterKill.result[1]!.fallbackReason}`);
    const again = await backupOnce({ marks: [['vdb', 29 * MiB, 0x34]] });
    assert.deepEqual(again.result.map((disk) => disk.plan), ['changed', 'changed']);
    assert.ok(covers(again.result[1]!.regions!, 29 * MiB, 64 * KiB));
    assert.equal((await virsh.checkpointNames(vmName)).filter((name) => name.includes(chainKey)).length, 1);
  });

  test('the CLI: host add libvirt registers the domains; backup in fleecing and regular mode, restore and hunt work on them', async () => {
    const env = { SNAPSHIFT_HOME: join(workspace.dir, 'home-cli'), SNAPSHIFT_PASSWORD: 'test-password' };
    const repo = join(workspace.dir, 'repo-cli');
    const expectOk = (result: { status: number; stdout: string; stderr: string }, what: string) => assert.equal(result.status, 0, `${what}: ${result.stderr}${result.stdout}`);
    expectOk(await runCli(['host', 'add', 'libvirt', '--uri', libvirt.uri, '--name', 'kvm1'], env), 'host add');
    const vms = await runCli(['vm', 'list', '--json'], env);
    expectOk(vms, 'vm list');
    assert.match(vms.stdout, new RegExp(`"${vmName}"`));
    expectOk(await runCli(['repo', 'init', repo], env), 'repo init');
    expectOk(await runCli(['backup', vmName, '--mode', 'fleecing', '--repo', repo, '--quiet'], env), 'backup --mode fleecing');
    expectOk(await runCli(['backup', vmName, '--mode', 'regular', '--repo', repo, '--quiet'], env), 'backup --mode regular');
    expectOk(await runCli(['restore', vmName, '--to', join(workspace.dir, 'restored-cli'), '--all-disks', '--repo', repo, '--quiet'], env), 'restore');
    assert.deepEqual(['vda', 'vdb'].map((disk) => readFileSync(join(workspace.dir, 'restored-cli', `${disk}.raw`)).length), [diskSizeBytes, diskSizeBytes]);
    expectOk(await runCli(['hunt'], env), 'hunt');
    assert.deepEqual((await virsh.disks(vmName)).map((disk) => disk.path), images());
    assert.equal(await virsh.backupJob(vmName), undefined);
  });
});

describe('a libvirt VM in storage-snapshot mode (btrfs datastore)', { skip }, () => {
  test('the VM snapshot is committed right after the storage snapshot; a full and a CBT incremental restore to their instants', async (t) => {
    // The datastore is mounted before the lab libvirtd starts: its private mount namespace sees no later mount.
    const lab = await labFor(t);
    const store = lab.datastore('btrfs');
    const image = join(store.vmDisksDir, 'lvs.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(diskSizeBytes)]);
    const workspace = await makeWorkspace('lvs');
    const libvirt = await LabLibvirt.start({ dir: join(workspace.dir, 'lv') });
    let domain: LabDomain | undefined;
    let catalog: Catalog | undefined;
    try {
      const virsh = new Virsh(libvirt.uri);
      domain = await LabDomain.start(virsh, { name: 'lvs', disks: [{ path: image }], runDir: join(workspace.dir, 'dom'), guest: await labGuestBoot(useSharedTestCache()) });
      mkdirSync(join(workspace.dir, 'home'));
      catalog = Catalog.open(join(workspace.dir, 'home'));
      const host = catalog.addHost({ kind: 'libvirt', name: 'lab-libvirt', uri: libvirt.uri });
      catalog.addVm({ name: 'lvs', hostName: host.name, ref: 'lvs', uuid: domain.uuid });
      await initRepository(join(workspace.dir, 'repo'), { password: 'test-password', encryption: true });
      await using repository = await openRepository(join(workspace.dir, 'repo'), { password: 'test-password' });
      for (const round of [0, 1]) {
        await domain.writePattern('vda', (4 + round) * MiB, 64 * KiB, 0x60 + round);
        let reference = '';
        const run = await runBackup({
          vms: [catalog.getVm('lvs')!],
          mode: 'storage-snapshot',
          repository,
          catalog,
          runDir: join(workspace.dir, 'run'),
          failoverToRegular: false,
          hooks: {
            beforeVmSnapshots: async () => {
              await virsh.run(['suspend', 'lvs']);
              await virsh.run(['qemu-monitor-command', 'lvs', '--hmp', 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"']);
              const raw = join(workspace.dir, 'reference.raw');
              await exec('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
              reference = await md5File(raw);
              await rm(raw);
            },
            afterVmSnapshots: () => virsh.run(['resume', 'lvs']).then(() => undefined),
          },
        });
        const outcome = run.outcomes[0]!;
        assert.equal(outcome.error, undefined, outcome.error?.stack);
        const { restorePoint, stats, storageKinds } = outcome.result!;
        assert.equal(stats.mode, 'storage-snapshot');
        assert.deepEqual(storageKinds, ['btrfs']);
        assert.deepEqual(stats.disks.map((disk) => disk.cbtSource), [round === 0 ? 'none' : 'bitmap']);
        t.diagnostic(`storage-snapshot #${round + 1}: VM snapshot lived ${Math.round(stats.vmSnapshotLifetimeMs)} ms, read ${(stats.readBytes / MiB).toFixed(1)} MiB`);
        const restored = join(workspace.dir, 'restored.raw');
        await restoreDisk(await repository.openRestorePoint(restorePoint.id), 'vda', restored, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
        assert.equal(await md5File(restored), reference, `storage-snapshot #${round + 1} restores to its instant`);
      }
      assert.deepEqual((await virsh.disks('lvs')).map((disk) => disk.path), [image]);
      assert.deepEqual(catalog.listVmSnapshotLedger(), []);
      assert.deepEqual(catalog.listStorageSnapshotLedger(), []);
    } finally {
      catalog?.close();
      await domain?.destroy().catch(() => undefined);
      await LabLibvirt.stopIn(libvirt.dir);
      await workspace.cleanup();
    }
  });
});
