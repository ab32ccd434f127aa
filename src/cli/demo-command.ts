import { randomBytes } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Command } from 'commander';
import { Catalog, type VmTarget } from '../catalog/index.ts';
import { SnapshiftError } from '../core/errors.ts';
import { Lab, defaultLabDir, formatByteSize, type LabVm } from '../lab/index.ts';
import { initRepository, openRepository, type Repository } from '../repository/index.ts';
import { formatSummary } from './backup-commands.ts';
import { demoBackup, verifyRestore, type DemoBackup } from './demo-backup.ts';
import { formatBytes, formatColumns, formatDuration } from './format.ts';
import { withExamples } from './help-examples.ts';
import { numberOption } from './number-option.ts';

interface DemoOptions {
  dir: string;
  keep?: boolean;
  seconds: number;
  rate: number;
}

/** What the demo's steps share; each step fills in what later ones need. */
interface DemoContext {
  options: { dir: string; watchSeconds: number; rateMiBps: number };
  lab?: Lab;
  vm?: LabVm;
  catalog?: Catalog;
  target?: VmTarget;
  repository?: Repository;
  backups: DemoBackup[];
}

/** One visible step of the demo, run in order from `demoSteps`. */
interface DemoStep {
  title: string;
  run(context: DemoContext): Promise<string | void>;
}

const demoVmName = 'demo';

const demoSteps: DemoStep[] = [
  {
    title: 'bring the lab up (btrfs and XFS datastores on loop files)',
    async run(context) {
      context.lab = await Lab.up({ dir: context.options.dir });
      const status = await context.lab.status();
      return status.datastores.map((d) => `${d.kind} on ${d.mountPoint} (${d.loopDevice})`).join(', ');
    },
  },
  {
    title: 'prepare the guest kernel (Debian cloud kernel, downloaded once and cached)',
    async run(context) {
      const { kernel } = await need(context.lab, 'lab').guest();
      return `${kernel.kernelVersion}${kernel.downloadMs === undefined ? ' (cached)' : ` (downloaded in ${(kernel.downloadMs / 1000).toFixed(1)} s)`}`;
    },
  },
  {
    title: `create VM "${demoVmName}" with a qcow2 disk on the btrfs datastore`,
    async run(context) {
      const lab = need(context.lab, 'lab');
      // A lab kept by an earlier `demo --keep` may still have the VM: start from a fresh disk.
      if ((await lab.status()).vms.some((v) => v.name === demoVmName)) await lab.removeVm(demoVmName);
      const vm = await lab.createVm(demoVmName, { datastore: 'btrfs', sizeBytes: 1024 ** 3, fillBytes: 300 * 1024 ** 2 });
      return `${vm.diskPath}: ${formatByteSize(vm.sizeBytes)}, ${formatByteSize(vm.fillBytes)} of random data`;
    },
  },
  {
    title: 'boot the guest and start its steady writes',
    async run(context) {
      context.vm = await need(context.lab, 'lab').startVm(demoVmName, { rateMiBps: context.options.rateMiBps });
      return `pid ${context.vm.pid}, workload running after ${((context.vm.bootMs ?? 0) / 1000).toFixed(1)} s, writing ${context.options.rateMiBps} MiB/s`;
    },
  },
  {
    title: 'watch the guest write (heartbeat once a second)',
    async run(context) {
      const vm = need(context.vm, 'vm');
      const until = Date.now() + context.options.watchSeconds * 1000;
      let shown = (await vm.heartbeats()).length;
      while (Date.now() < until) {
        await new Promise((resolve) => setTimeout(resolve, 250));
        const heartbeats = await vm.heartbeats();
        for (const beat of heartbeats.slice(shown)) {
          console.log(`    guest up ${beat.uptimeS.toFixed(0).padStart(3)} s: ${String(beat.writes).padStart(6)} writes, ${String(beat.writtenMiB).padStart(4)} MiB written, ${beat.behind} behind, ${beat.errors} errors`);
        }
        shown = heartbeats.length;
        if (!(await vm.isRunning())) throw new SnapshiftError('LAB_VM_FAILED', 'the demo guest stopped unexpectedly');
      }
      const last = (await vm.heartbeats()).at(-1);
      return last ? `${last.writtenMiB} MiB written so far, still running` : 'no heartbeat seen';
    },
  },
  {
    title: 'register the VM in a demo catalog and create an encrypted repository',
    async run(context) {
      const lab = need(context.lab, 'lab');
      const vm = need(context.vm, 'vm');
      const paths = demoPaths(lab);
      // A folder left by an earlier `demo --keep` holds the old catalog and repository: start fresh.
      await rm(paths.folder, { recursive: true, force: true });
      await mkdir(paths.home, { recursive: true, mode: 0o700 });
      context.catalog = Catalog.open(paths.home);
      // nbdSocketPath null: the guest's QEMU runs no NBD server of its own, the engine starts one per backup.
      context.target = context.catalog.addQemuVm({ name: demoVmName, qmpSocketPath: vm.qmpSocketPath });
      const password = randomBytes(24).toString('base64url');
      await writeFile(paths.passwordFile, `${password}\n`, { mode: 0o600 });
      await initRepository(paths.repository, { password, encryption: true });
      context.repository = await openRepository(paths.repository, { password });
      return `catalog in ${paths.home}, repository ${paths.repository} (encrypted; password in ${paths.passwordFile})`;
    },
  },
  backupStep('regular', 'back up in regular mode: the VM snapshot stays open for the whole copy'),
  backupStep('storage-snapshot', 'back up in storage-snapshot mode: the VM snapshot stays open only until the btrfs snapshot'),
  backupStep('fleecing', 'back up in fleecing mode: no VM snapshot at all, the guest\'s writes copy old blocks aside while the copy runs'),
  {
    title: 'restore every backup and compare it with its point in time',
    async run(context) {
      const repository = need(context.repository, 'repository');
      const scratch = demoPaths(need(context.lab, 'lab')).scratch;
      // Both at once: each waits on the disk and on md5sum in turn, so together they overlap well.
      const verifications = await Promise.all(context.backups.map((backup) => verifyRestore(backup, repository, scratch)));
      for (const [index, backup] of context.backups.entries()) {
        backup.verification = verifications[index]!;
        const { referenceMd5, restoredMd5, equal, restoreMs } = backup.verification;
        console.log(`    ${backup.mode.padEnd(16)} restored in ${formatDuration(restoreMs)}: md5 ${restoredMd5} ${equal ? '=' : '≠'} ${referenceMd5} at the point in time  ${equal ? 'OK' : 'MISMATCH'}`);
      }
      const failed = context.backups.filter((backup) => !backup.verification?.equal).length;
      return failed === 0 ? `all ${context.backups.length} restores equal their point in time, bit for bit` : `${failed} restore(s) differ from their point in time`;
    },
  },
  {
    title: 'compare the three processing modes',
    async run(context) {
      const vm = need(context.vm, 'vm');
      const [regular, storage, fleecing] = (['regular', 'storage-snapshot', 'fleecing'] as const).map((mode) => {
        const backup = context.backups.find((candidate) => candidate.mode === mode);
        if (!backup) throw new Error(`demo step order: no ${mode} backup yet`);
        return backup;
      }) as [DemoBackup, DemoBackup, DemoBackup];
      console.log(indent(formatComparison([regular, storage, fleecing]), '    '));
      const ratio = regular.stats.vmSnapshotLifetimeMs / Math.max(1, storage.stats.vmSnapshotLifetimeMs);
      console.log(`\n    In storage-snapshot mode the guest ran on a VM snapshot ${ratio.toFixed(0)}x shorter, so its delta at commit`);
      console.log(`    was ${formatBytes(storage.stats.deltaBytesAtCommit)} instead of ${formatBytes(regular.stats.deltaBytesAtCommit)}; the copy read from the btrfs snapshot instead.`);
      console.log(`    Fleecing took no VM snapshot and committed nothing: its scratch held ${formatBytes(fleecing.stats.scratchBytes ?? 0)} of old blocks for ${formatDuration(fleecing.stats.fleecingLifetimeMs ?? 0)}.`);
      const unverified = context.backups.filter((backup) => !backup.verification?.equal);
      if (unverified.length > 0) throw new SnapshiftError('DEMO_VERIFY_FAILED', `restore verification failed for: ${unverified.map((backup) => backup.mode).join(', ')}`);
      if (!(await vm.isRunning())) throw new SnapshiftError('LAB_VM_FAILED', 'the demo guest stopped during the demo');
      const last = (await vm.heartbeats()).at(-1);
      return `guest still running: ${last?.writtenMiB ?? 0} MiB written in all, ${last?.errors ?? 0} write errors`;
    },
  },
];

/** A backup step: runs `mode` on the writing guest, prints its summary and the guest's heartbeats around it. */
function backupStep(mode: DemoBackup['mode'], title: string): DemoStep {
  return {
    title,
    async run(context) {
      const lab = need(context.lab, 'lab');
      const backup = await demoBackup({
        target: need(context.target, 'target'),
        vm: need(context.vm, 'vm'),
        mode,
        repository: need(context.repository, 'repository'),
        catalog: need(context.catalog, 'catalog'),
        runDir: demoPaths(lab).runDir,
        referenceDir: join(lab.datastore('btrfs').mountPoint, 'demo-reference'),
        showProgress: true,
      });
      context.backups.push(backup);
      const summary = indent(formatSummary(backup.stats), '  ');
      // Two demo-only lines, aligned with the summary's value column.
      const valueColumn = summary.split('\n')[0]!.lastIndexOf(' ') + 1;
      const line = (label: string, value: string) => console.log(`    ${label}`.padEnd(valueColumn) + value);
      console.log(summary);
      line(
        'reference copy',
        mode === 'fleecing'
          ? `${formatDuration(backup.referenceCopyMs)} (reflink of the disk with the guest paused, just before the fleecing started)`
          : `${formatDuration(backup.referenceCopyMs)} (reflink of the base at the VM snapshot, inside its lifetime)`,
      );
      line('guest meanwhile', `heartbeats ${backup.heartbeatsBefore} → ${backup.heartbeatsAfter}, ${backup.writtenMiBBefore} → ${backup.writtenMiBAfter} MiB written`);
      return `restore point ${backup.restorePointId.slice(0, 12)}, ${formatDuration(backup.totalMs)} in all`;
    },
  };
}

/** The side-by-side table of what each mode cost the guest and how long it took. */
function formatComparison(backups: readonly DemoBackup[]): string {
  const row = (label: string, value: (backup: DemoBackup) => string): string[] => [label, ...backups.map(value)];
  return formatColumns(
    ['', ...backups.map((backup) => backup.mode)],
    [
      row('VM-snapshot lifetime', (b) => (b.mode === 'fleecing' ? 'none' : formatDuration(b.stats.vmSnapshotLifetimeMs))),
      row('delta at commit', (b) => (b.mode === 'fleecing' ? 'none' : formatBytes(b.stats.deltaBytesAtCommit))),
      row('commit time', (b) => (b.mode === 'fleecing' ? 'none' : formatDuration(b.stats.commitMs))),
      row('fleecing lifetime / scratch', (b) => (b.stats.fleecingLifetimeMs === null || b.stats.fleecingLifetimeMs === undefined ? '-' : `${formatDuration(b.stats.fleecingLifetimeMs)} / ${formatBytes(b.stats.scratchBytes ?? 0)}`)),
      row('storage-snapshot lifetime', (b) => (b.stats.storageSnapshotLifetimeMs === null ? '-' : formatDuration(b.stats.storageSnapshotLifetimeMs))),
      row('total time', (b) => formatDuration(b.totalMs)),
      row('read / rate', (b) => `${formatBytes(b.stats.readBytes)} at ${b.stats.rateMBps.toFixed(0)} MB/s`),
      row('guest wrote meanwhile', (b) => `${b.writtenMiBAfter - b.writtenMiBBefore} MiB (${b.heartbeatsAfter - b.heartbeatsBefore} heartbeats)`),
      row('restore verified', (b) => (b.verification === undefined ? 'not run' : b.verification.equal ? 'yes (md5 equal)' : 'NO (md5 differs)')),
    ],
  );
}

/** The demo's own files, inside the lab folder (removed with it unless --keep). */
function demoPaths(lab: Lab) {
  const folder = join(lab.dir, 'demo');
  return {
    folder,
    home: join(folder, 'home'),
    repository: join(folder, 'repository'),
    passwordFile: join(folder, 'repository.password'),
    runDir: join(folder, 'run'),
    scratch: join(folder, 'scratch'),
  };
}

function indent(text: string, prefix: string): string {
  return text
    .split('\n')
    .map((line) => prefix + line)
    .join('\n');
}

/**
 * `snapshift demo`: the lab, a real guest writing steadily, a regular-mode, a storage-snapshot-mode and a
 * fleecing backup of it, every restore checked against its point in time, and the three modes side by side;
 * torn down at the end.
 */
export function registerDemoCommand(program: Command): void {
  withExamples(program.command('demo'), 'snapshift demo', 'snapshift demo --keep --rate 8')
    .description('back up a writing guest in all three processing modes, verify the restores, compare, tear it all down (needs root)')
    .option('--dir <dir>', 'lab folder', defaultLabDir)
    .option('--keep', 'leave the lab and the running VM up at the end')
    .option('--seconds <n>', 'how long to watch the guest before the backups', numberOption('--seconds', { integer: false, min: 0, unit: 'seconds' }), 3)
    .option('--rate <MiBps>', 'guest write rate', numberOption('--rate', { min: 0, unit: 'MiB/s' }), 4)
    .action(async (options: DemoOptions) => {
      await runDemo({ options: { dir: options.dir, watchSeconds: options.seconds, rateMiBps: options.rate }, backups: [] }, options.keep === true);
    });
}

async function runDemo(context: DemoContext, keep: boolean): Promise<void> {
  const started = Date.now();
  let failed = false;
  // Ctrl-C must not leave a guest, mounts and loop devices behind: tear down from the state file, then exit.
  const onInterrupt = (): void => {
    console.log('\ninterrupted: taking the lab down');
    const demoFolder = context.lab ? demoPaths(context.lab).folder : undefined;
    (demoFolder ? rm(demoFolder, { recursive: true, force: true }) : Promise.resolve()).then(() => Lab.down(context.options.dir)).then(
      () => process.exit(130),
      (error: unknown) => {
        console.error(`snapshift: lab down failed: ${error instanceof Error ? error.message : String(error)}`);
        process.exit(2);
      },
    );
  };
  process.once('SIGINT', onInterrupt);
  console.log(`snapshift demo: a tiny guest writes ${context.options.rateMiBps} MiB/s while it is backed up three times, in regular,`);
  console.log('storage-snapshot and fleecing mode; each restore is checked against its point in time, then the modes compared.\n');
  try {
    for (const [index, step] of demoSteps.entries()) {
      const stepStarted = Date.now();
      console.log(`[${index + 1}/${demoSteps.length}] ${step.title}`);
      const summary = await step.run(context);
      console.log(`    ${summary ? `${summary} ` : ''}(${((Date.now() - stepStarted) / 1000).toFixed(1)} s)`);
    }
  } catch (error) {
    failed = true;
    throw error;
  } finally {
    process.off('SIGINT', onInterrupt);
    await context.repository?.close();
    context.catalog?.close();
    if (keep && !failed) {
      const paths = context.lab ? demoPaths(context.lab) : undefined;
      console.log(`kept: lab in ${context.options.dir}, VM "${demoVmName}" running${paths ? `, catalog in ${paths.home}, repository ${paths.repository}` : ''}`);
      console.log(`  look around:  bin/snapshift --home ${paths?.home ?? '…'} restore-points`);
      console.log(`  remove it all: bin/snapshift lab down --dir ${context.options.dir}${paths ? ` && rm -r ${paths.folder}` : ''}`);
    } else {
      if (context.lab) await rm(demoPaths(context.lab).folder, { recursive: true, force: true });
      const downStarted = Date.now();
      // Down from the state file even when a step failed before `lab` was set (up itself cleans up, but a
      // later step may have made a VM).
      const report = await Lab.down(context.options.dir);
      if (report.wasUp) console.log(`lab down: ended ${report.endedPids.length} process(es), removed ${report.removedDatastores.join(' and ')} (${((Date.now() - downStarted) / 1000).toFixed(1)} s)`);
    }
    if (!failed) console.log(`demo done in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  }
}

function need<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new Error(`demo step order: no ${what} yet`);
  return value;
}
