// One conformance suite for every hypervisor adapter (restic's backend/test, for hypervisors): what a user relies
// on, checked the same way on each, through runBackup (the public processing path) and the adapter interface.
// An adapter's test file supplies a "bed": a VM target on that adapter with a guest writing to it, a probe that
// proves a restored disk is the point in time, a list of our leftovers on the host, a real qemu-ga behind the
// VM's agent, and teardown. `describeHypervisorConformance(name, makeBed)` registers the tests.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Catalog } from '../../src/catalog/index.ts';
import type { FaultPoint } from '../../src/core/fault-points.ts';
import { withLab, type Lab } from '../../src/lab/index.ts';
import { runBackup, type BackupRunInput, type ProcessingMode, type VmOutcome } from '../../src/processing/backup-run.ts';
import { huntOverlaysOnHosts, huntVmSnapshots } from '../../src/processing/snapshot-hunter.ts';
import type { Repository } from '../../src/repository/index.ts';
import { restoreDisk } from '../../src/restore/disk-restore.ts';
import type { AgentBehaviour } from './host-guest-agent.ts';

const MiB = 1024 * 1024;
export const conformancePassword = 'conformance';

/** Hooks around the point in time, and the proof that restored disks are that point in time. */
export interface PointInTimeProbe {
  hooks: { beforeVmSnapshots: () => Promise<void>; afterVmSnapshots: () => Promise<void> };
  /** Fails unless every restored disk (name → raw image path) is the guest's disk at the point in time. */
  assertRestored(restored: ReadonlyMap<string, string>): Promise<void>;
}

export interface ConformanceBed {
  readonly catalog: Catalog;
  readonly repository: Repository;
  /** Home of the catalog (a child process opens it) and the repository's path. */
  readonly home: string;
  readonly repositoryPath: string;
  readonly runDir: string;
  readonly scratchDir: string;
  readonly vmName: string;
  readonly disks: ReadonlyArray<{ name: string; sizeBytes: number }>;
  /** The VM's disks are on a file system a storage system can snapshot (btrfs): storage-snapshot mode runs. */
  readonly storageSnapshots: boolean;
  /** The probe pauses the guest (a guest agent cannot answer then): quiesced backups go without the probe. */
  readonly probePausesGuest: boolean;
  probe(): PointInTimeProbe;
  /** Everything of ours on the host: overlays, scratch images, block nodes, exports, jobs, checkpoints or bitmaps not in the chain, ledger rows, storage snapshots. [] when clean. */
  leftovers(): Promise<string[]>;
  /** The guest runs on its own disks, wrote on since the last call without an error, and lost no write. */
  assertGuestWell(): Promise<void>;
  /** Makes a write now (while whatever is open stays open) and returns a check that the disk still holds it. */
  markWrite(): Promise<() => Promise<void>>;
  /** The real qemu-ga behind the VM's agent channel. */
  agent: { start(behaviour: AgentBehaviour): Promise<void>; stop(): Promise<void>; events(): string[] };
  /** guest-fsfreeze-status through the same path the adapter uses. */
  agentFreezeStatus(): Promise<string>;
  close(): Promise<void>;
}

/** The repository as a backup sees it, whose writes of disk data fail after the first chunk (a full disk, an I/O error). */
function failingRepository(repository: Repository): Repository {
  const failingDisk = <T extends object>(disk: T): T => {
    let chunks = 0;
    return new Proxy(disk, {
      get(target, property) {
        const value = Reflect.get(target, property, target) as unknown;
        if (property === 'putChunk') {
          return async (...args: unknown[]) => {
            if (++chunks > 1) throw new Error('injected: the repository could not write a pack (No space left on device)');
            return (value as (...a: unknown[]) => unknown).apply(target, args);
          };
        }
        return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
      },
    });
  };
  const failingWriter = <T extends object>(writer: T): T =>
    new Proxy(writer, {
      get(target, property) {
        const value = Reflect.get(target, property, target) as unknown;
        if (property === 'addDisk') return (...args: unknown[]) => failingDisk((value as (...a: unknown[]) => object).apply(target, args));
        return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
      },
    });
  return new Proxy(repository, {
    get(target, property) {
      const value = Reflect.get(target, property, target) as unknown;
      if (property === 'startBackup') return async (...args: unknown[]) => failingWriter(await (value as (...a: unknown[]) => Promise<object>).apply(target, args));
      return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
    },
  });
}

/** Registers the conformance tests for one adapter; `makeBed` sets its VM up (the lab, with a btrfs datastore, is up). */
export function describeHypervisorConformance(adapter: string, makeBed: (lab: Lab) => Promise<ConformanceBed>, options: { skip?: string | false } = {}): void {
  describe(`hypervisor conformance: ${adapter}`, { skip: options.skip ?? false }, () => {
    // Outer: the lab's datastores are mounted before the bed starts (a lab libvirtd sees only earlier mounts) and
    // unmounted after the bed's teardown, which runs first (inner `after`).
    const lab = withLab();
    describe('through runBackup and the adapter', () => {
      let bed: ConformanceBed | undefined;
      const theBed = (): ConformanceBed => bed ?? assert.fail('the bed did not start');
      before(async () => {
        bed = await makeBed(lab());
      });
      after(async () => {
        await bed?.close();
      });

      async function backup(mode: ProcessingMode, extra: Partial<BackupRunInput> = {}): Promise<VmOutcome> {
        const { catalog, repository, runDir, vmName } = theBed();
        const run = await runBackup({ vms: [catalog.getVm(vmName)!], mode, repository, catalog, runDir, failoverToRegular: false, ...extra });
        assert.equal(run.outcomes.length, 1);
        return run.outcomes[0]!;
      }

      /** Restores every disk of a restore point to raw files and has the probe check them. */
      async function assertRestoresTo(restorePointId: string, probe: PointInTimeProbe): Promise<void> {
        const { repository, scratchDir, disks } = theBed();
        const restored = new Map<string, string>();
        try {
          for (const disk of disks) {
            const target = join(scratchDir, `restored-${disk.name}.raw`);
            await restoreDisk(await repository.openRestorePoint(restorePointId), disk.name, target, { format: 'raw', force: true, chunkSizeBytes: repository.chunkSizeBytes });
            restored.set(disk.name, target);
          }
          await probe.assertRestored(restored);
        } finally {
          for (const path of restored.values()) await rm(path, { force: true });
        }
      }

      async function assertClean(what: string): Promise<void> {
        assert.deepEqual(await theBed().leftovers(), [], `${what}: nothing of ours is left`);
        await theBed().assertGuestWell();
      }

      const modes = (): ProcessingMode[] => ['regular', 'fleecing', ...(theBed().storageSnapshots ? (['storage-snapshot'] as const) : [])];

      test('1. point in time exact under writes: regular, fleecing and storage-snapshot mode restore hash-equal to their instant', async (t) => {
        for (const mode of modes()) {
          const probe = theBed().probe();
          const outcome = await backup(mode, { full: true, hooks: probe.hooks });
          assert.equal(outcome.error, undefined, `${mode}: ${outcome.error?.stack}`);
          const { restorePoint, stats } = outcome.result!;
          assert.equal(stats.mode, mode);
          await assertRestoresTo(restorePoint.id, probe);
          await assertClean(mode);
          t.diagnostic(`${mode}: ${Math.round(stats.durationMs)} ms, read ${(stats.readBytes / MiB).toFixed(1)} MiB, VM snapshot ${Math.round(stats.vmSnapshotLifetimeMs)} ms, fleecing ${stats.fleecingLifetimeMs ?? '-'} ms`);
        }
      });

      test('2. the VM snapshot (or fleecing) is removed after every failure: aborted mid-copy, the repository write failing, a failure right after the snapshot', async (t) => {
        for (const mode of ['regular', 'fleecing'] as const) {
          const abort = new AbortController();
          let abortedAt = -1;
          const aborted = await backup(mode, {
            signal: abort.signal,
            maxReadBytesPerSecond: 16 * MiB,
            onProgress: (progress) => {
              if (progress.phase === 'copy' && progress.processedBytes > 0 && !abort.signal.aborted) {
                abortedAt = progress.processedBytes;
                abort.abort(new Error('stopped by the admin'));
              }
            },
          });
          assert.ok(aborted.error, `${mode}: an aborted backup fails`);
          assert.ok(abortedAt > 0 && abortedAt < theBed().disks.reduce((sum, disk) => sum + disk.sizeBytes, 0), `${mode}: aborted mid-copy (${abortedAt} bytes in)`);
          await assertClean(`${mode}, aborted mid-copy (${aborted.error.message})`);

          const failedWrite = await backup(mode, { repository: failingRepository(theBed().repository) });
          assert.match(failedWrite.error?.message ?? '', /could not write a pack/, `${mode}: the repository's failure is the backup's error`);
          await assertClean(`${mode}, repository write failed`);

          const failedAfter = await backup(mode, {
            hooks: {
              afterVmSnapshots: () => {
                throw new Error('injected: failure right after the point in time');
              },
            },
          });
          assert.match(failedAfter.error?.message ?? '', /right after the point in time/);
          await assertClean(`${mode}, failure right after the snapshot`);
          t.diagnostic(`${mode}: aborted at ${(abortedAt / MiB).toFixed(1)} MiB; errors: ${[aborted, failedWrite, failedAfter].map((outcome) => outcome.error?.message).join(' | ')}`);
        }
      });

      test('3. CBT exact across 3 incrementals: each restores to its instant and reads a fraction of the disks', async (t) => {
        const incrementalModes: ProcessingMode[] = ['regular', 'fleecing', theBed().storageSnapshots ? 'storage-snapshot' : 'regular'];
        // A fresh base first: test 2's failed backups moved no base on, so everything the guest wrote while
        // they ran (a minute on a loaded machine) would count against the first incremental's fraction.
        const base = await backup('regular');
        assert.equal(base.error, undefined, `the base before the incrementals: ${base.error?.stack}`);
        for (const [index, mode] of incrementalModes.entries()) {
          await new Promise((resolve) => setTimeout(resolve, 1500)); // the guest writes something new
          const probe = theBed().probe();
          const outcome = await backup(mode, { hooks: probe.hooks });
          assert.equal(outcome.error, undefined, `incremental ${index + 1} (${mode}): ${outcome.error?.stack}`);
          const { restorePoint, stats } = outcome.result!;
          for (const disk of stats.disks) {
            assert.notEqual(disk.cbtSource, 'none', `incremental ${index + 1} (${mode}), disk ${disk.name}: changed-block tracking used (${disk.fallbackReason})`);
            const sizeBytes = theBed().disks.find((candidate) => candidate.name === disk.name)!.sizeBytes;
            assert.ok(disk.dirtyBytes !== null && disk.dirtyBytes < sizeBytes / 2, `incremental ${index + 1}, disk ${disk.name}: ${disk.dirtyBytes} of ${sizeBytes} bytes changed`);
          }
          assert.ok(stats.readBytes < theBed().disks.reduce((sum, disk) => sum + disk.sizeBytes, 0) / 2, `incremental ${index + 1} read ${stats.readBytes} bytes`);
          await assertRestoresTo(restorePoint.id, probe);
          await assertClean(`incremental ${index + 1}`);
          t.diagnostic(`incremental ${index + 1} (${mode}): read ${(stats.readBytes / MiB).toFixed(1)} MiB; ${stats.disks.map((disk) => `${disk.name} ${disk.cbtSource} ${((disk.dirtyBytes ?? 0) / MiB).toFixed(1)} MiB dirty`).join(', ')}`);
        }
      });

      /** Runs test/support/conformance-child.ts, which must die by SIGKILL at `point`. */
      async function backupKilledAt(mode: ProcessingMode, point: FaultPoint): Promise<void> {
        const { home, repositoryPath, vmName } = theBed();
        const child = spawn(process.execPath, ['--import', 'tsx', 'test/support/conformance-child.ts', home, repositoryPath, mode, vmName], {
          env: { ...process.env, SNAPSHIFT_FAULT: point, SNAPSHIFT_PASSWORD: conformancePassword },
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let output = '';
        child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
        child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
        const signal = await new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
        assert.equal(signal, 'SIGKILL', `the backup was to die at ${point}: ${output}`);
      }

      for (const [mode, point, what] of [
        ['regular', 'vm-snapshot.after-transaction', 'the VM snapshot open'],
        ['fleecing', 'fleece.after-start', 'fleecing active'],
      ] as const) {
        test(`4. the hunter cleans up after SIGKILL with ${what} (${point}); the guest kept writing and lost nothing`, async (t) => {
          await backupKilledAt(mode, point);
          const left = await theBed().leftovers();
          assert.ok(left.some((item) => /ledger row/.test(item)), `the killed backup left its ledger row: ${left.join('; ')}`);
          const marked = await theBed().markWrite();
          const actions = [...(await huntVmSnapshots(theBed().catalog)), ...(await huntOverlaysOnHosts(theBed().catalog))];
          assert.deepEqual(actions.filter((action) => action.action === 'left-in-place'), [], 'the hunter left nothing in place');
          assert.ok(actions.length > 0, 'the hunter found what the kill left');
          await assertClean(`after the hunt (${actions.map((action) => action.action).join(', ')})`);
          await marked();
          t.diagnostic(`left by the kill: ${left.join('; ')}; hunted: ${actions.map((action) => `${action.action} ${action.overlayPath}`).join('; ')}`);
        });
      }

      test('5. quiesce with a real qemu-ga: app-consistent when the freeze succeeds, a refused freeze fails the backup with the reason, no agent means crash-consistent with a note; never left frozen', async (t) => {
        const bedNow = theBed();
        try {
          await bedNow.agent.start('freezes');
          for (const mode of ['regular', 'fleecing'] as const) {
            const before = bedNow.agent.events().length;
            const probe = bedNow.probePausesGuest ? undefined : bedNow.probe();
            const outcome = await backup(mode, { quiesce: true, ...(probe ? { hooks: probe.hooks } : {}) });
            assert.equal(outcome.error, undefined, `${mode}, quiesced: ${outcome.error?.stack}`);
            assert.match(outcome.result!.stats.quiesce ?? '', /^quiesced: /, `${mode}: the restore point says it is app-consistent`);
            assert.deepEqual(bedNow.agent.events().slice(before), ['freeze', 'thaw'], `${mode}: the agent froze the file system once and thawed it`);
            assert.equal(await bedNow.agentFreezeStatus(), 'thawed');
            if (probe) await assertRestoresTo(outcome.result!.restorePoint.id, probe);
            await assertClean(`${mode}, quiesced`);
            t.diagnostic(`${mode}: ${outcome.result!.stats.quiesce}`);
          }

          await bedNow.agent.start('refuses-freeze');
          for (const mode of ['regular', 'fleecing'] as const) {
            const before = bedNow.agent.events().length;
            const refused = await backup(mode, { quiesce: true });
            assert.match(refused.error?.message ?? '', /guest-fsfreeze-freeze.*disabled|disabled.*guest-fsfreeze-freeze/i, `${mode}: a refused freeze fails the backup, saying why: ${refused.error?.message}`);
            // qemu-ga runs its thaw hook on every thaw: 'thaw' here proves the adapter thawed after the failed freeze.
            assert.deepEqual(bedNow.agent.events().slice(before), ['thaw'], `${mode}: a thaw followed the refused freeze`);
            assert.equal(await bedNow.agentFreezeStatus(), 'thawed');
            await assertClean(`${mode}, freeze refused`);
            t.diagnostic(`${mode}, freeze refused: ${refused.error?.message}`);
          }

          await bedNow.agent.stop();
          const absent = await backup('regular', { quiesce: true });
          assert.equal(absent.error, undefined, `no agent: ${absent.error?.stack}`);
          assert.match(absent.result!.stats.quiesce ?? '', /^not quiesced: .*crash-consistent$/, 'no agent: crash-consistent, and the note says so');
          await assertClean('no agent');
          t.diagnostic(`no agent: ${absent.result!.stats.quiesce}`);
        } finally {
          await bedNow.agent.stop();
        }
      });
    });
  });
}
