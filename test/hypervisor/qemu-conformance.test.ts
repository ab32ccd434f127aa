// The hypervisor conformance suite (test/support/hypervisor-conformance.ts) on the QEMU adapter: a VM stand-in
// (qemu-storage-daemon, two qcow2 disks on the lab's btrfs datastore) written by SteadyWriters through NBD, so any
// image proves which instant it holds (cutOf/expectedAt); a real qemu-ga (chrooted, freezing only its own ext4)
// on the VM's agent socket.
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { exec } from '../../src/core/exec.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { GuestAgent } from '../../src/hypervisor/qemu/guest-agent.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import type { Lab } from '../../src/lab/index.ts';
import { StorageDaemon } from '../../src/lab/storage-daemon.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { conformancePassword, describeHypervisorConformance, type ConformanceBed } from '../support/hypervisor-conformance.ts';
import { HostGuestAgent } from '../support/host-guest-agent.ts';
import { SteadyWriter } from '../support/steady-writer.ts';
import { makeWorkspace } from '../support/workspace.ts';
import { engineLeftovers } from '../support/engine-leftovers.ts';

const MiB = 1024 * 1024;
const vmName = 'conf-qemu';
const disks = [
  { name: 'disk0', sizeBytes: 64 * MiB, data: [[0, 8 * MiB], [56 * MiB, 4 * MiB]] as Array<[number, number]>, region: [16 * MiB, 16 * MiB] },
  { name: 'disk1', sizeBytes: 32 * MiB, data: [[0, 2 * MiB]] as Array<[number, number]>, region: [4 * MiB, 8 * MiB] },
];

async function qemuBed(lab: Lab): Promise<ConformanceBed> {
  const workspace = await makeWorkspace('conf-qemu');
  const folder = lab.datastore('btrfs').vmDisksDir;
  const home = join(workspace.dir, 'home');
  const runDir = join(home, 'run');
  mkdirSync(runDir, { recursive: true });
  mkdirSync(join(workspace.dir, 'vm'));
  const images = disks.map((disk) => join(folder, `${vmName}-${disk.name}.qcow2`));
  for (const [index, disk] of disks.entries()) await exec('qemu-img', ['create', '-q', '-f', 'qcow2', images[index]!, String(disk.sizeBytes)]);
  const daemon = await StorageDaemon.start({ dir: join(workspace.dir, 'vm'), images: disks.map((disk, index) => ({ path: images[index]!, format: 'qcow2' as const, nodeName: disk.name })) });
  const writers: SteadyWriter[] = [];
  for (const disk of disks) {
    writers.push(
      await SteadyWriter.prepare({
        connect: () => NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: disk.name }),
        sizeBytes: disk.sizeBytes,
        dataRanges: disk.data,
        regionOffsetBytes: disk.region[0]!,
        regionBytes: disk.region[1]!,
        intervalMs: 20,
      }),
    );
  }
  for (const writer of writers) writer.start();
  const agent = await HostGuestAgent.prepare(join(workspace.dir, 'qga'));
  const catalog = Catalog.open(home);
  catalog.addQemuVm({ name: vmName, qmpSocketPath: daemon.qmpSocketPath, nbdSocketPath: daemon.nbdSocketPath, qgaSocketPath: agent.socketPath });
  const repositoryPath = join(workspace.dir, 'repo');
  await initRepository(repositoryPath, { password: conformancePassword, encryption: true });
  const repository = await openRepository(repositoryPath, { password: conformancePassword });
  const checkedUpTo = writers.map(() => 0);

  return {
    catalog,
    repository,
    home,
    repositoryPath,
    runDir,
    scratchDir: workspace.dir,
    vmName,
    disks: disks.map(({ name, sizeBytes }) => ({ name, sizeBytes })),
    storageSnapshots: true,
    probePausesGuest: false,

    probe() {
      let before: number[] = [];
      let after: number[] = [];
      return {
        hooks: {
          beforeVmSnapshots: async () => void (before = writers.map((writer) => writer.completed)),
          afterVmSnapshots: async () => void (after = writers.map((writer) => writer.completed)),
        },
        async assertRestored(restored) {
          for (const [index, disk] of disks.entries()) {
            const image = await readFile(restored.get(disk.name)!);
            const writer = writers[index]!;
            const cut = writer.cutOf(image);
            assert.equal(SteadyWriter.firstDifference(image, writer.expectedAt(cut)), undefined, `${disk.name}: the restore is the guest's disk after write ${cut}`);
            // A write in flight at the instant may be in it: it was sent before, completed after.
            assert.ok(cut >= before[index]! && cut <= after[index]! + 1, `${disk.name}: cut ${cut} within the point in time's window [${before[index]}, ${after[index]! + 1}]`);
          }
        },
      };
    },

    async leftovers() {
      const found: string[] = [];
      for (const name of readdirSync(folder)) if (!images.some((image) => image.endsWith(`/${name}`))) found.push(`file ${name} beside the disks`);
      {
        await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
        const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name?: string }> }>>('query-named-block-nodes', { flat: true });
        for (const node of nodes) {
          if (node['node-name'].startsWith('snapshift-')) found.push(`block node ${node['node-name']}`);
          // One tracking bitmap per disk and chain: the chain's; any other is a leftover.
          const bitmaps = (node['dirty-bitmaps'] ?? []).filter((bitmap) => String(bitmap.name ?? '').startsWith('snapshift-'));
          if (bitmaps.length > 1) found.push(`bitmaps on ${node['node-name']}: ${bitmaps.map((bitmap) => bitmap.name).join(', ')}`);
        }
        const exports = await qmp.execute<Array<{ id: string }>>('query-block-exports');
        for (const entry of exports) if (entry.id.startsWith('snapshift-')) found.push(`NBD export ${entry.id}`);
        for (const job of await qmp.execute<Array<{ device: string; status: string }>>('query-block-jobs')) found.push(`block job ${job.device} (${job.status})`);
      }
      return [...found, ...engineLeftovers(catalog, runDir, lab.datastore('btrfs').mountPoint)];
    },

    async assertGuestWell() {
      for (const [index, writer] of writers.entries()) {
        const last = await writer.stop();
        try {
          assert.deepEqual(writer.errors.map((error) => error.message), [], `${disks[index]!.name}: the guest never failed a write`);
          assert.ok(last > checkedUpTo[index]!, `${disks[index]!.name}: the guest kept writing (write ${last})`);
          checkedUpTo[index] = last;
          await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName: disks[index]!.name });
          const live = await nbd.read(0, disks[index]!.sizeBytes);
          assert.equal(SteadyWriter.firstDifference(live, writer.expectedAt(last)), undefined, `${disks[index]!.name}: the live disk holds every write up to ${last}`);
        } finally {
          writer.start();
        }
      }
    },

    async markWrite() {
      // The steady writers are the marks: assertGuestWell proves every write they made is on the disk.
      return async () => undefined;
    },

    agent,
    async agentFreezeStatus() {
      await using guestAgent = await GuestAgent.connect(agent.socketPath);
      // Awaited here: `await using` closes the connection as the function returns, before a returned promise settles.
      return await guestAgent.execute<string>('guest-fsfreeze-status');
    },

    async close() {
      for (const writer of writers) await writer.stop();
      await agent.close();
      await repository.close();
      catalog.close();
      await daemon.stop();
      await workspace.cleanup();
    },
  };
}

const skip = process.getuid?.() !== 0 ? 'needs root (loop-mounted btrfs, a chrooted qemu-ga)' : false;
describeHypervisorConformance('qemu', qemuBed, { skip });
