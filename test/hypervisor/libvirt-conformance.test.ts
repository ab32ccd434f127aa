// The hypervisor conformance suite (test/support/hypervisor-conformance.ts) on the libvirt adapter: the lab's own
// libvirtd, the tiny guest under TCG writing 1 MiB/s at random to vda (qcow2, on the lab's btrfs datastore); vdb
// (qcow2) takes host-side pattern writes only. The point in time: the domain paused and its disks copied in
// `beforeVmSnapshots`, resumed in `afterVmSnapshots`. A real qemu-ga (chrooted on the host, freezing only its own
// ext4) sits behind the domain's agent channel: the channel connects to a relay that pipes libvirt to it.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { Virsh } from '../../src/hypervisor/libvirt/virsh.ts';
import type { Lab } from '../../src/lab/index.ts';
import { LabDomain, labGuestBoot } from '../../src/lab/lab-libvirt-domain.ts';
import { LabLibvirt } from '../../src/lab/lab-libvirt.ts';
import { useSharedTestCache } from '../../src/lab/with-lab.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { conformancePassword, describeHypervisorConformance, type ConformanceBed } from '../support/hypervisor-conformance.ts';
import { HostGuestAgent } from '../support/host-guest-agent.ts';
import { makeWorkspace, md5File } from '../support/workspace.ts';
import { engineLeftovers } from '../support/engine-leftovers.ts';

const MiB = 1024 * 1024;
const vmName = 'conf-lv';
const disks = [
  { name: 'vda', sizeBytes: 256 * MiB },
  { name: 'vdb', sizeBytes: 64 * MiB },
];

async function libvirtBed(lab: Lab): Promise<ConformanceBed> {
  const workspace = await makeWorkspace('conf-lv');
  const folder = lab.datastore('btrfs').vmDisksDir;
  const home = join(workspace.dir, 'home');
  const runDir = join(home, 'run');
  mkdirSync(runDir, { recursive: true });
  const images = disks.map((disk) => join(folder, `${vmName}-${disk.name}.qcow2`));
  for (const [index, disk] of disks.entries()) {
    // qcow2: libvirt's checkpoints (CBT) need images that hold bitmaps.
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', images[index]!, String(disk.sizeBytes)]);
    await exec('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a ${4 * MiB} ${8 * MiB}`, images[index]!]);
  }
  const agent = await HostGuestAgent.prepare(join(workspace.dir, 'qga'));
  const libvirt = await LabLibvirt.start({ dir: join(workspace.dir, 'lv') });
  const virsh = new Virsh(libvirt.uri);
  let domain: LabDomain;
  try {
    domain = await LabDomain.start(virsh, {
      name: vmName,
      disks: images.map((path) => ({ path, format: 'qcow2' as const })),
      runDir: join(workspace.dir, 'dom'),
      guest: await labGuestBoot(useSharedTestCache()),
      rateMiBps: 1,
      guestAgent: { connectTo: agent.relaySocketPath },
    });
    await domain.waitForHeartbeats(1);
  } catch (error) {
    await LabLibvirt.stopIn(libvirt.dir);
    throw error;
  }
  const catalog = Catalog.open(home);
  catalog.addHost({ name: 'lab-libvirt', kind: 'libvirt', uri: libvirt.uri });
  catalog.addVm({ name: vmName, hostName: 'lab-libvirt', ref: vmName, uuid: domain.uuid });
  const repositoryPath = join(workspace.dir, 'repo');
  // 256 KiB chunks (the smallest): the guest writes 64 KiB blocks at random all over vda, so with 1 MiB chunks
  // the ~12 s between test 1's last full and test 3's first incremental (test 2's failed backups) touch half of
  // vda's chunks, and an exact incremental reads half the disk. Smaller chunks keep the read near what changed.
  await initRepository(repositoryPath, { password: conformancePassword, encryption: true, chunkSizeBytes: 256 * 1024 });
  const repository = await openRepository(repositoryPath, { password: conformancePassword });
  let checkedWrites = 0;
  let marks = 0;

  /** Flushes QEMU's writes of every disk to the image files (the domain may be paused). */
  const flush = async () => {
    for (const disk of await virsh.disks(vmName)) await virsh.run(['qemu-monitor-command', vmName, '--hmp', `qemu-io -d /machine/peripheral/${disk.alias}/virtio-backend "flush"`]);
  };

  return {
    catalog,
    repository,
    home,
    repositoryPath,
    runDir,
    scratchDir: workspace.dir,
    vmName,
    disks,
    storageSnapshots: true,
    // libvirt refuses agent commands to a paused domain: a quiesced backup cannot be bracketed by a pause.
    probePausesGuest: true,

    probe() {
      const references = new Map<string, string>();
      return {
        hooks: {
          beforeVmSnapshots: async () => {
            await virsh.run(['suspend', vmName]);
            await flush();
            for (const [index, disk] of disks.entries()) {
              const reference = join(workspace.dir, `reference-${disk.name}.raw`);
              await exec('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', images[index]!, reference]);
              references.set(disk.name, reference);
            }
          },
          afterVmSnapshots: async () => {
            await virsh.run(['resume', vmName]);
          },
        },
        async assertRestored(restored) {
          try {
            for (const disk of disks) assert.equal(await md5File(restored.get(disk.name)!), await md5File(references.get(disk.name)!), `${disk.name}: the restore equals the disk at the paused instant`);
          } finally {
            for (const reference of references.values()) await rm(reference, { force: true });
          }
        },
      };
    },

    async leftovers() {
      const found: string[] = [];
      for (const name of readdirSync(folder)) if (!images.some((image) => image.endsWith(`/${name}`))) found.push(`file ${name} beside the disks`);
      const active = await virsh.disks(vmName);
      for (const disk of active) if (!images.includes(disk.path ?? '') || disk.backingChain.length > 0) found.push(`disk ${disk.target} on ${disk.path} (chain of ${disk.backingChain.length})`);
      const job = await virsh.backupJob(vmName);
      if (job) found.push(`backup job (socket ${job.server?.socketPath})`);
      for (const disk of active) if (await virsh.blockJob(vmName, disk.target)) found.push(`block job on ${disk.target}`);
      // The chain's tracking state is its latest checkpoint: any other is a leftover.
      const checkpoints = await virsh.checkpointNames(vmName);
      if (checkpoints.length > 1) found.push(`checkpoints ${checkpoints.join(', ')}`);
      for (const name of existsSync(runDir) ? readdirSync(runDir) : []) if (/snapshift-.*\.(qcow2|scratch)/.test(name)) found.push(`scratch ${name} in the run folder`);
      return [...found, ...engineLeftovers(catalog, runDir, lab.datastore('btrfs').mountPoint)];
    },

    async assertGuestWell() {
      assert.ok(await domain.isRunning(), 'the domain runs');
      const heartbeats = await domain.waitForHeartbeats((await domain.heartbeats()).length + 1);
      const last = heartbeats.at(-1)!;
      assert.equal(last.errors, 0, 'the guest never failed a write');
      assert.ok(last.writes > checkedWrites, `the guest kept writing (${checkedWrites} → ${last.writes} writes)`);
      checkedWrites = last.writes;
    },

    async markWrite() {
      // vdb takes no writes of the guest's own: a pattern there stays unless a commit or a hunt loses it.
      const offset = (16 + 2 * (marks % 16)) * MiB;
      const pattern = 0x40 + (marks++ % 64);
      await domain.writePattern('vdb', offset, 64 * 1024, pattern);
      return async () => {
        await flush();
        const { stdout } = await exec('qemu-io', ['-U', '-r', '-f', 'qcow2', '-c', `read -P 0x${pattern.toString(16)} ${offset} ${64 * 1024}`, images[1]!]);
        assert.doesNotMatch(stdout, /Pattern verification failed/, `the write made while it was open is in vdb's own image (0x${pattern.toString(16)} at ${offset})`);
      };
    },

    agent,
    async agentFreezeStatus() {
      return virsh.agentCommand<string>(vmName, 'guest-fsfreeze-status');
    },

    async close() {
      await repository.close();
      catalog.close();
      await domain.destroy().catch(() => undefined);
      await LabLibvirt.stopIn(libvirt.dir);
      await agent.close();
      await workspace.cleanup();
    },
  };
}

const missing = ['/usr/sbin/libvirtd', '/usr/sbin/virtlogd', '/usr/bin/virsh', '/usr/sbin/qemu-ga'].filter((program) => !existsSync(program));
const skip = process.getuid?.() !== 0 ? 'needs root (a privileged libvirtd)' : missing.length > 0 ? `not installed: ${missing.join(', ')}` : false;
describeHypervisorConformance('libvirt', libvirtBed, { skip });
