import { rm } from 'node:fs/promises';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { perDiskRecordOf, type ChangedBlockSource, type DiskReadPlan } from '../../datamover/changed-blocks.ts';
import type { Region } from '../../datamover/extent-map.ts';
import { NbdDiskSource } from '../../datamover/nbd-disk-source.ts';
import type { CbtPlanInput, VmCbtPlan, VmDisk } from '../hypervisor.ts';
import { backupSocketPath, chainKeyOfCheckpoint, checkpointNameFor, scratchPath } from './libvirt-names.ts';
import { checkpointXml, pullBackupXml } from './libvirt-xml.ts';
import type { Virsh } from './virsh.ts';

/** What a restore point records (`extra.cbt`) so the next backup of a libvirt VM can trust its checkpoint. */
export interface LibvirtCbtRecord {
  kind: 'libvirt-checkpoint';
  /** The checkpoint whose bitmaps record the writes since this restore point. */
  checkpoint: string;
  /**
   * `checkpoint-dumpxml --no-domain` of it: a transient domain loses checkpoint metadata when it stops (its
   * bitmaps stay in the qcow2), and `checkpoint-create --redefine` of this text brings the checkpoint back.
   */
  checkpointXml: string | null;
  disks: Record<string, { imagePath: string; virtualSizeBytes: number }>;
}

/** A libvirt CBT plan: besides what every plan says, how the VM snapshot or the fleecing starts the new checkpoint. */
export interface LibvirtCbtPlan extends VmCbtPlan {
  readonly kind: 'libvirt-checkpoints';
  readonly record: LibvirtCbtRecord;
  /** Creates the new checkpoint now (right before a VM snapshot); a failure becomes a warning of `finish`. */
  startTracking(): Promise<void>;
  /** The new checkpoint's XML, for a fleecing `backup-begin` that creates it with the job. */
  readonly newCheckpointXml: string;
  /** The checkpoint a disk's changes are read from (for an incremental export of it), if the disk is read so. */
  incrementalFrom(diskName: string): string | undefined;
  /** The fleecing job created the new checkpoint and serves each changed disk's bitmap on `socketPath`. */
  trackingStartedWithJob(socketPath: string): Promise<void>;
}

export function isLibvirtCbtPlan(plan: VmCbtPlan | undefined): plan is LibvirtCbtPlan {
  return (plan as LibvirtCbtPlan | undefined)?.kind === 'libvirt-checkpoints';
}

/** The libvirt CBT record of a restore point, if it has a well-formed one. */
export function libvirtCbtRecordOf(restorePoint: { extra: Record<string, unknown> }): LibvirtCbtRecord | undefined {
  const cbt = restorePoint.extra['cbt'] as Partial<LibvirtCbtRecord> | undefined;
  if (!cbt || typeof cbt !== 'object' || cbt.kind !== 'libvirt-checkpoint' || typeof cbt.checkpoint !== 'string') return undefined;
  const disks = perDiskRecordOf(restorePoint.extra, 'cbt', ({ imagePath, virtualSizeBytes }) =>
    typeof imagePath === 'string' && typeof virtualSizeBytes === 'number' ? { imagePath, virtualSizeBytes } : undefined,
  );
  return { kind: 'libvirt-checkpoint', checkpoint: cbt.checkpoint, checkpointXml: typeof cbt.checkpointXml === 'string' ? cbt.checkpointXml : null, disks: disks?.disks ?? {} };
}

export interface LibvirtCbtDomain {
  name: string;
  /** Every disk target of the domain: the ones not backed up are named `checkpoint='no'` / `backup='no'`. */
  allTargets: readonly string[];
}

/**
 * Plans CBT for a libvirt domain with checkpoints named `snapshift-<chainKey>-<tag>`. The previous restore
 * point's checkpoint is trusted for a disk when it still exists (or can be redefined from the record), its
 * bitmaps are sound, and the disk's image and size are unchanged. The changes of such a disk are read, after
 * the VM snapshot, as the block status of a pull-mode `backup-begin` incremental from that checkpoint (only the
 * bitmap is used; data comes from the frozen base), or from the fleecing job itself. This repository's other
 * checkpoints (interrupted tasks) are deleted, which merges their bitmaps into older ones: never a lost write.
 */
export async function planLibvirtChangedBlocks(virsh: Virsh, domain: LibvirtCbtDomain, disks: readonly VmDisk[], input: CbtPlanInput): Promise<LibvirtCbtPlan> {
  const latest = input.latest;
  const previous = latest ? libvirtCbtRecordOf(latest) : undefined;
  const newCheckpoint = checkpointNameFor(input.chainKey, input.tag);
  const warnings: string[] = [];

  // Is the previous checkpoint usable at all (for any disk)?
  let checkpointProblem: string | undefined;
  let names = await virsh.checkpointNames(domain.name);
  if (!latest) checkpointProblem = undefined;
  else if (!previous) checkpointProblem = `the previous restore point ${latest.id.slice(0, 12)} has no libvirt checkpoint record`;
  else if (chainKeyOfCheckpoint(previous.checkpoint) !== input.chainKey) checkpointProblem = `checkpoint ${previous.checkpoint} belongs to another repository's chain (was restore point ${latest.id.slice(0, 12)} copied from another repository?)`;
  else if (!names.includes(previous.checkpoint)) {
    checkpointProblem = await redefine(virsh, domain.name, previous);
    names = await virsh.checkpointNames(domain.name);
  }
  let trackedDisks = new Set<string>();
  if (previous && checkpointProblem === undefined && latest) {
    try {
      // --size asks QEMU to sum the bitmaps: a missing or inconsistent bitmap (QEMU was killed) fails here.
      const checkpoint = await virsh.checkpoint(domain.name, previous.checkpoint, { size: true });
      trackedDisks = new Set(checkpoint.disks.filter((disk) => disk.checkpoint === 'bitmap').map((disk) => disk.name));
    } catch (error) {
      checkpointProblem = `checkpoint ${previous.checkpoint} cannot be used (${messageOf(error)})`;
    }
  }
  if (previous && checkpointProblem === undefined && latest && !input.full) {
    // libvirt checks a checkpoint's bitmaps (present, recording, consistent) only when a backup job starts from
    // it, and `--size` passes broken ones: a job begun and aborted at once is the check (~0.3 s). Seen broken:
    // after QEMU was killed, and after an offline `qemu-img commit` (the base's bitmap stopped recording).
    const candidates = disks.filter((disk) => trackedDisks.has(disk.name) && disk.format === 'qcow2').map((disk) => disk.name);
    if (candidates.length > 0) checkpointProblem = await probeCheckpoint(virsh, domain, previous.checkpoint, candidates, input);
  }
  const usablePrevious = latest && previous && checkpointProblem === undefined ? previous.checkpoint : undefined;

  // This repository's checkpoints the plan does not use: left by interrupted tasks, or broken.
  for (const name of names) {
    if (chainKeyOfCheckpoint(name) !== input.chainKey || name === usablePrevious) continue;
    try {
      await deleteCheckpoint(virsh, domain.name, name);
    } catch (error) {
      warnings.push(`checkpoint ${name} of ${domain.name} could not be deleted: ${messageOf(error)}`);
    }
  }

  const readPlans = new Map<string, DiskReadPlan>();
  const incremental = new Map<string, string>();
  const record: LibvirtCbtRecord = { kind: 'libvirt-checkpoint', checkpoint: newCheckpoint, checkpointXml: null, disks: {} };
  const plan = new CheckpointPlan(virsh, domain, disks, input, record, newCheckpoint, usablePrevious, incremental, warnings);
  for (const disk of disks) {
    const recorded = previous?.disks[disk.name];
    let fallbackReason: string | undefined;
    if (!latest) fallbackReason = undefined; // the first backup of the VM: a full read, nothing to explain
    else if (checkpointProblem !== undefined) fallbackReason = checkpointProblem;
    else if (disk.format !== 'qcow2') fallbackReason = `disk ${disk.name} is ${disk.format}: only qcow2 images hold checkpoint bitmaps`;
    else if (!recorded || !trackedDisks.has(disk.name)) fallbackReason = `checkpoint ${previous!.checkpoint} does not track disk ${disk.name}`;
    else if (recorded.virtualSizeBytes !== disk.virtualSizeBytes) fallbackReason = `disk ${disk.name} was resized from ${recorded.virtualSizeBytes} to ${disk.virtualSizeBytes} bytes`;
    else if (recorded.imagePath !== disk.imagePath) fallbackReason = `disk ${disk.name} now uses image ${disk.imagePath}, not ${recorded.imagePath}`;
    else if (input.full) fallbackReason = 'a full read was asked for (--full)';
    if (usablePrevious && fallbackReason === undefined) {
      incremental.set(disk.name, usablePrevious);
      readPlans.set(disk.name, { kind: 'changed', source: new CheckpointSource(plan, disk.name) });
    } else {
      readPlans.set(disk.name, { kind: 'full', fallbackReason });
    }
    if (disk.format === 'qcow2') record.disks[disk.name] = { imagePath: disk.imagePath, virtualSizeBytes: disk.virtualSizeBytes };
  }
  plan.readPlans = readPlans;
  return plan;
}

/** Begins and aborts a pull backup incremental from `checkpoint` for `diskNames`; the reason when libvirt refuses. */
async function probeCheckpoint(virsh: Virsh, domain: LibvirtCbtDomain, checkpoint: string, diskNames: readonly string[], input: CbtPlanInput): Promise<string | undefined> {
  const socketPath = backupSocketPath(input.runDir, input.tag, 'cbt');
  await rm(socketPath, { force: true });
  const wanted = new Set(diskNames);
  const jobDisks = diskNames.map((name) => ({ name, scratchPath: scratchPath(input.runDir, name, input.tag, name), incremental: checkpoint }));
  for (const disk of jobDisks) await rm(disk.scratchPath, { force: true });
  try {
    await virsh.backupBegin(domain.name, pullBackupXml({ socketPath, disks: jobDisks, excludedDisks: domain.allTargets.filter((target) => !wanted.has(target)) }));
  } catch (error) {
    return `checkpoint ${checkpoint} cannot be used (${messageOf(error)})`;
  }
  await virsh.jobAbort(domain.name);
  return undefined;
}

/** Brings back a checkpoint a transient domain lost (its bitmaps are in the qcow2); the reason when it cannot. */
async function redefine(virsh: Virsh, domain: string, previous: LibvirtCbtRecord): Promise<string | undefined> {
  if (!previous.checkpointXml) return `checkpoint ${previous.checkpoint} is gone from domain ${domain} and the restore point holds no definition to bring it back`;
  try {
    // Its parent was deleted when the next restore point was made: redefined as a root, it stands alone.
    await virsh.checkpointCreate(domain, previous.checkpointXml.replace(/<parent>[\s\S]*?<\/parent>\s*/, ''), { redefine: true });
    return undefined;
  } catch (error) {
    return `checkpoint ${previous.checkpoint} is gone from domain ${domain} (a transient domain restarted?) and redefining it failed (${messageOf(error)})`;
  }
}

/** Deletes a checkpoint, merging its bitmaps into its parent's; one whose bitmaps are broken loses its metadata only. */
export async function deleteCheckpoint(virsh: Virsh, domain: string, name: string): Promise<void> {
  try {
    await virsh.checkpointDelete(domain, name);
  } catch (error) {
    await virsh.checkpointDelete(domain, name, { metadataOnly: true }).catch(() => {
      throw error;
    });
  }
}

class CheckpointPlan implements LibvirtCbtPlan {
  readonly kind = 'libvirt-checkpoints' as const;
  readPlans: ReadonlyMap<string, DiskReadPlan> = new Map();
  readonly baseRestorePointId: string | undefined;
  #jobSocketPath: string | undefined;
  #probe: Promise<Map<string, Region[]>> | undefined;
  #finished = false;

  constructor(
    private readonly virsh: Virsh,
    private readonly domain: LibvirtCbtDomain,
    private readonly disks: readonly VmDisk[],
    private readonly input: CbtPlanInput,
    readonly record: LibvirtCbtRecord,
    private readonly newCheckpoint: string,
    private readonly previousCheckpoint: string | undefined,
    private readonly incremental: ReadonlyMap<string, string>,
    private readonly warnings: string[],
  ) {
    this.baseRestorePointId = input.latest?.id;
  }

  /** Bitmaps for the disks the record tracks (qcow2 ones), none for the domain's other disks. */
  get newCheckpointXml(): string {
    const tracked = new Set(Object.keys(this.record.disks));
    return checkpointXml({
      name: this.newCheckpoint,
      description: `snapshift: writes since the restore point of session ${this.input.tag}`,
      disks: this.domain.allTargets.map((target) => ({ name: target, bitmap: tracked.has(target) })),
    });
  }

  incrementalFrom(diskName: string): string | undefined {
    return this.incremental.get(diskName);
  }

  async startTracking(): Promise<void> {
    try {
      await this.virsh.checkpointCreate(this.domain.name, this.newCheckpointXml);
      this.record.checkpointXml = await this.virsh.checkpointDefinition(this.domain.name, this.newCheckpoint);
    } catch (error) {
      // Not fatal to this backup: the next one finds no checkpoint and reads in full, saying why.
      this.warnings.push(`checkpoint ${this.newCheckpoint} of ${this.domain.name} could not be created: ${messageOf(error)}`);
    }
  }

  async trackingStartedWithJob(socketPath: string): Promise<void> {
    this.#jobSocketPath = socketPath;
    try {
      this.record.checkpointXml = await this.virsh.checkpointDefinition(this.domain.name, this.newCheckpoint);
    } catch (error) {
      this.warnings.push(`the definition of checkpoint ${this.newCheckpoint} could not be read (a restart of a transient domain will then need a full read): ${messageOf(error)}`);
    }
  }

  /** A disk's changed regions: from the fleecing job when one serves them, else from one shared query job. */
  async changedRegionsOf(diskName: string): Promise<Region[]> {
    if (this.#jobSocketPath !== undefined) return readDirtyRegions(this.#jobSocketPath, diskName);
    this.#probe ??= this.#queryChanges();
    const regions = (await this.#probe).get(diskName);
    if (!regions) throw new Error(`no changed-block answer for disk ${diskName}`);
    return regions;
  }

  /**
   * One pull-mode backup job, incremental from the previous checkpoint, for every changed disk at once (libvirt
   * runs one backup job per domain): its export's `backup-<disk>` bitmap is read, then the job is aborted.
   */
  async #queryChanges(): Promise<Map<string, Region[]>> {
    const socketPath = backupSocketPath(this.input.runDir, this.input.tag, 'cbt');
    await rm(socketPath, { force: true });
    const changed = this.disks.filter((disk) => this.incremental.has(disk.name));
    const scratch = changed.map((disk) => ({ name: disk.name, scratchPath: scratchPath(this.input.runDir, disk.imagePath, this.input.tag, disk.name), incremental: this.previousCheckpoint }));
    for (const disk of scratch) await rm(disk.scratchPath, { force: true });
    const wanted = new Set(changed.map((disk) => disk.name));
    try {
      await this.virsh.backupBegin(this.domain.name, pullBackupXml({ socketPath, disks: scratch, excludedDisks: this.domain.allTargets.filter((target) => !wanted.has(target)) }));
    } catch (error) {
      if (!(error instanceof SnapshiftError && error.code === 'LIBVIRT_CHECKPOINT_INCONSISTENT')) throw error;
      // Broken since the plan checked it (QEMU restarted in between?): every byte counts as changed, a full read
      // under another name; the restore point is still whole, and the warning says why it read so much.
      this.warnings.push(`checkpoint ${this.previousCheckpoint} broke after it was checked (${messageOf(error)}): disks ${changed.map((disk) => disk.name).join(', ')} were read in full`);
      return new Map(changed.map((disk) => [disk.name, [{ offset: 0, length: disk.virtualSizeBytes }]]));
    }
    try {
      const regions = new Map<string, Region[]>();
      for (const disk of changed) regions.set(disk.name, await readDirtyRegions(socketPath, disk.name));
      return regions;
    } finally {
      await this.virsh.jobAbort(this.domain.name);
    }
  }

  async finish(succeeded: boolean): Promise<string[]> {
    if (this.#finished) return [];
    this.#finished = true;
    const warnings = [...this.warnings];
    try {
      const names = await this.virsh.checkpointNames(this.domain.name);
      if (!names.includes(this.newCheckpoint)) return warnings; // tracking never started: nothing to keep or undo
      if (succeeded) {
        // The new checkpoint covers everything the next backup needs; the previous one merges into its parent.
        if (this.previousCheckpoint && this.previousCheckpoint !== this.newCheckpoint && names.includes(this.previousCheckpoint)) await deleteCheckpoint(this.virsh, this.domain.name, this.previousCheckpoint);
      } else {
        // Undone: its bitmap merges into the previous checkpoint's, which then still covers every write.
        await deleteCheckpoint(this.virsh, this.domain.name, this.newCheckpoint);
      }
    } catch (error) {
      // A checkpoint left behind is deleted by the next backup's plan, which then reads in full, saying why.
      warnings.push(`checkpoints of ${this.domain.name} not cleaned up: ${messageOf(error)}`);
    }
    return warnings;
  }
}

class CheckpointSource implements ChangedBlockSource {
  readonly kind = 'bitmap' as const;
  constructor(
    private readonly plan: CheckpointPlan,
    private readonly diskName: string,
  ) {}

  changedRegions(): Promise<Region[]> {
    return this.plan.changedRegionsOf(this.diskName);
  }
}

/** libvirt names each disk's export after its target and the export's bitmap `backup-<target>` (formatbackup.html). */
async function readDirtyRegions(socketPath: string, diskName: string): Promise<Region[]> {
  const bitmap = `backup-${diskName}`;
  await using source = await NbdDiskSource.openBitmap(socketPath, diskName, bitmap);
  return await source.dirtyRegions(bitmap);
}
