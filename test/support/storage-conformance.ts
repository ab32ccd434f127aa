import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { Catalog } from '../../src/catalog/index.ts';
import { SnapshiftError } from '../../src/core/errors.ts';
import { exportImageReadOnly } from '../../src/datamover/image-exporter.ts';
import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { huntStorageSnapshots } from '../../src/processing/storage-hunter.ts';
import type { StorageSystem, Volume } from '../../src/storage/storage-system.ts';
import { makeWorkspace } from './workspace.ts';

const MiB = 1024 * 1024;
const blockBytes = 4096;
/** Measured: XFS's file-by-file clones (forced through this test) were torn in 2-3 of 20 snapshots; btrfs in none of 40. */
const lockstepSnapshots = 20;

/** A snapshot its user took with the storage's own tools (not ours to touch). */
export interface UserSnapshot {
  readonly location: string;
  exists(): Promise<boolean>;
  remove(): Promise<void>;
}

/** A volume that holds one image and can be made to disappear, as when its user deletes it. */
export interface VanishingVolume {
  readonly volume: Volume;
  readonly imagePath: string;
  /** What an error about it must name for a person to know which one it was. */
  readonly name: string;
  /** Deletes it with the storage's own tools, as its user would (taking along what the storage requires). */
  vanish(): Promise<void>;
}

/**
 * One storage provider under test: how to make images on it, write to them, read them, and look at the
 * storage with its own tools. Methods are called only inside tests, so they may use a lab brought up in `before`.
 */
export interface StorageBed {
  readonly name: string;
  system(): StorageSystem;
  /** A raw image of `sizeBytes` zeros on the storage; `deep` puts it under an odd, deep path. Returns the path snapshift sees. */
  makeImage(name: string, sizeBytes: number, options?: { deep?: boolean }): Promise<string>;
  /** A raw image that is not on this storage (`scratchDir` is a folder of the suite on another filesystem). */
  makeForeignImage(name: string, scratchDir: string): Promise<string>;
  /** Writes `lengthBytes` of `byte` at `offsetBytes` and returns once the write is stable. */
  writePattern(imagePath: string, offsetBytes: number, lengthBytes: number, byte: number): Promise<void>;
  /** The live image as the image exporter opens it (a file path or QEMU `json:{…}`). */
  readablePath(imagePath: string): string;
  userSnapshot(imagePath: string): Promise<UserSnapshot>;
  /** Everything on the storage that carries our name: snapshots, clones, reflink-copy folders. */
  ownLeftovers(): Promise<string[]>;
  makeVanishingVolume(): Promise<VanishingVolume>;
  /**
   * true when one snapshot cuts every image of a volume at one instant by itself (btrfs, ZFS); otherwise why
   * not (file-by-file clones, one volume per image): there the VM snapshot holding the bases still does it.
   */
  readonly imagesCutTogether: true | string;
}

/**
 * The storage providers' conformance suite (STYLE.md: one suite per adapter family, as restic's backend/test):
 * registers one describe block that checks `bed`'s StorageSystem does what processing and the hunter rely on.
 */
export function describeStorageConformance(bed: StorageBed): void {
  describe(`storage conformance: ${bed.name}`, () => {
    let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
    let catalog: Catalog;
    let exports = 0;

    before(async () => {
      workspace = await makeWorkspace(`stconf-${bed.name}`);
      mkdirSync(join(workspace.dir, 'home'));
      mkdirSync(join(workspace.dir, 'foreign'));
      catalog = Catalog.open(join(workspace.dir, 'home'));
    });
    after(async () => {
      catalog?.close();
      await workspace?.cleanup();
    });

    /** Bytes of an image (a snapshot's `imageAt`, or a live image's readable path), read through our own image exporter. */
    async function readImage(readablePath: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
      await using served = await exportImageReadOnly({ imagePath: readablePath, format: 'raw', runDir: workspace.dir, exportName: `read-${exports++}` });
      await using nbd = await NbdClient.connect({ socketPath: served.socketPath, exportName: served.exportName });
      return nbd.read(offsetBytes, lengthBytes);
    }

    async function assertPattern(readablePath: string, offsetBytes: number, lengthBytes: number, byte: number, what: string): Promise<void> {
      const bytes = await readImage(readablePath, offsetBytes, lengthBytes);
      assert.ok(bytes.every((value) => value === byte), `${what}: expected 0x${byte.toString(16)} throughout, read 0x${bytes[0]!.toString(16)}… (${readablePath})`);
    }

    async function locateOrFail(imagePath: string): Promise<Volume> {
      const volume = await bed.system().locate(imagePath);
      assert.ok(volume, `${bed.name} locates ${imagePath}`);
      return volume;
    }

    async function assertNothingOfOursOn(volumes: readonly Volume[], when: string): Promise<void> {
      assert.deepEqual(await bed.system().listOwnSnapshots(volumes), [], `${when}: listOwnSnapshots is empty`);
      assert.deepEqual(await bed.ownLeftovers(), [], `${when}: nothing named like ours is left on the storage`);
    }

    /** A crashed session's ledger row, as storage-snapshot mode writes it before it asks the storage. */
    function recordIntent(volumes: readonly Volume[], ownerPid: number): string {
      const sessionId = randomUUID();
      const sessionTag = sessionId.slice(0, 8);
      catalog.recordStorageSnapshotIntent({ vmNames: ['conformance-vm'], ownerPid, sessionId, systemKind: bed.system().kind, volumes: [...volumes], sessionTag });
      return sessionTag;
    }

    test('locate: an image on the storage is found on its volume; one elsewhere is not ours', async () => {
      const imagePath = await bed.makeImage('located', MiB);
      const volume = await locateOrFail(imagePath);
      assert.equal(volume.kind, bed.system().kind);
      assert.ok(volume.id.length > 0);
      assert.deepEqual(await bed.system().locate(imagePath), volume, 'locating again gives the same volume');
      const foreign = await bed.makeForeignImage('foreign.raw', join(workspace.dir, 'foreign'));
      assert.equal(await bed.system().locate(foreign), undefined, `${foreign} is not on ${bed.name}`);
    });

    test('a snapshot is point in time: it reads pattern A, the live images pattern B, for every image of the volume', async () => {
      const images = [await bed.makeImage('pit-a', 4 * MiB), await bed.makeImage('pit-b', 4 * MiB)];
      for (const imagePath of images) await bed.writePattern(imagePath, MiB, MiB, 0xaa);
      const volumes = dedupe(await Promise.all(images.map(locateOrFail)));
      const sessionTag = newTag();
      await using snapshot = await bed.system().snapshot(volumes, sessionTag, images);
      for (const imagePath of images) await bed.writePattern(imagePath, MiB, MiB, 0xbb);
      for (const imagePath of images) {
        await assertPattern(snapshot.imageAt(imagePath), MiB, MiB, 0xaa, `the snapshot of ${imagePath}`);
        await assertPattern(snapshot.imageAt(imagePath), 0, MiB, 0, `the snapshot of ${imagePath}, unwritten part`);
        await assertPattern(bed.readablePath(imagePath), MiB, MiB, 0xbb, `the live ${imagePath}`);
      }
      assert.ok(snapshot.info.every((item) => item.kind === bed.system().kind && item.sessionTag === sessionTag));
      assert.deepEqual(sortedLocations(await bed.system().listOwnSnapshots(volumes)), sortedLocations(snapshot.info), 'listOwnSnapshots shows exactly this snapshot');
      const foreign = await bed.makeForeignImage('not-in-snapshot.raw', join(workspace.dir, 'foreign'));
      assert.throws(() => snapshot.imageAt(foreign), (error: unknown) => error instanceof SnapshiftError && error.code === 'STORAGE_IMAGE_NOT_IN_SNAPSHOT');
    });

    test('several images on one volume are cut at one instant: a writer in lockstep across them is never seen half-way', async (t) => {
      if (bed.imagesCutTogether !== true) {
        t.skip(bed.imagesCutTogether);
        return;
      }
      const images = [await bed.makeImage('lockstep-a', MiB), await bed.makeImage('lockstep-b', MiB)];
      const volumes = dedupe(await Promise.all(images.map(locateOrFail)));
      assert.equal(volumes.length, 1, 'both images are on one volume');
      // Round n writes byte n (1..250, cycling) to the first image, then to the second, each stable before the next.
      // At any instant the first holds the second's round or the one after it; a snapshot must show the same.
      const writer = { round: 0, stop: false };
      const writing = (async () => {
        while (!writer.stop) {
          const byte = (writer.round % 250) + 1;
          for (const imagePath of images) await bed.writePattern(imagePath, 0, blockBytes, byte);
          writer.round++;
        }
      })();
      const cuts: Array<{ first: number; second: number; roundsWhileTaking: number }> = [];
      try {
        while (writer.round < 3) await new Promise((resolve) => setTimeout(resolve, 5));
        // Several snapshots, so the writer is caught in the middle of at least some of them.
        for (let attempt = 0; attempt < lockstepSnapshots; attempt++) {
          const roundBefore = writer.round;
          await using snapshot = await bed.system().snapshot(volumes, newTag(), images);
          const roundsWhileTaking = writer.round - roundBefore;
          const [first, second] = await Promise.all(images.map((imagePath) => readImage(snapshot.imageAt(imagePath), 0, blockBytes)));
          for (const bytes of [first!, second!]) assert.ok(bytes.every((value) => value === bytes[0]), 'each block is one round, whole');
          cuts.push({ first: first![0]!, second: second![0]!, roundsWhileTaking });
        }
      } finally {
        writer.stop = true;
        await writing;
      }
      t.diagnostic(`writer: ${writer.round} rounds; rounds written while each snapshot was taken: ${cuts.map((cut) => cut.roundsWhileTaking).join(', ')}`);
      assert.ok(cuts.some((cut) => cut.roundsWhileTaking > 0), 'the writer wrote while a snapshot was taken (else this proves nothing)');
      assert.ok(cuts.every(({ first, second }) => first !== 0 && second !== 0), 'the writer had begun before each snapshot');
      const torn = cuts.filter(({ first, second }) => first !== second && first !== (second % 250) + 1);
      assert.deepEqual(torn.map(({ first, second }) => `first image at round ${first}, second at ${second}`), [], `${torn.length} of ${cuts.length} snapshots were not one instant`);
    });

    test('removal leaves nothing: after disposing, listOwnSnapshots is empty and no snapshot, clone or copy of ours remains', async () => {
      const imagePath = await bed.makeImage('removed', MiB);
      await bed.writePattern(imagePath, 0, MiB, 0x5a);
      const volume = await locateOrFail(imagePath);
      const snapshot = await bed.system().snapshot([volume], newTag(), [imagePath]);
      assert.equal((await bed.system().listOwnSnapshots([volume])).length, snapshot.info.length);
      assert.notDeepEqual(await bed.ownLeftovers(), [], 'the snapshot is visible with the storage\'s own tools');
      await snapshot[Symbol.asyncDispose]();
      await snapshot[Symbol.asyncDispose](); // a second disposal (an undo stack run twice) is harmless
      assert.ok(snapshot.lifetimeMs > 0);
      await assertNothingOfOursOn([volume], 'after disposal');
      await assertPattern(bed.readablePath(imagePath), 0, MiB, 0x5a, 'the live image is untouched');
    });

    test("hunter: ours from a gone session are removed (ledger row, or only our name); a live session's and the user's own stay; a dry run changes nothing", async () => {
      const system = bed.system();
      const imagePath = await bed.makeImage('hunted', MiB);
      const volume = await locateOrFail(imagePath);
      const deadPid = await pidOfEndedProcess();
      const orphanTag = recordIntent([volume], deadPid);
      const orphan = await system.snapshot([volume], orphanTag, [imagePath]); // never disposed: its session died
      const stray = await system.snapshot([volume], newTag(), [imagePath]); // our name, no ledger row: found because its volume is in the dead session's row
      const liveTag = recordIntent([volume], process.pid);
      await using live = await system.snapshot([volume], liveTag, [imagePath]); // a running task's
      const user = await bed.userSnapshot(imagePath);
      const goneLocations = sortedLocations([...orphan.info, ...stray.info]);
      const allOurs = sortedLocations([...orphan.info, ...stray.info, ...live.info]);
      assert.deepEqual(sortedLocations(await system.listOwnSnapshots([volume])), allOurs, "listOwnSnapshots shows ours, not the user's");

      const dryActions = await huntStorageSnapshots(catalog, { dryRun: true, systems: [system] });
      assert.deepEqual(sortedLocations(dryActions.filter((action) => action.action === 'removed')), goneLocations, `a dry run names what it would remove: ${JSON.stringify(dryActions)}`);
      assert.deepEqual(sortedLocations(await system.listOwnSnapshots([volume])), allOurs, 'a dry run removes nothing');
      assert.ok(await user.exists(), "the user's snapshot is there after the dry run");
      assert.equal(catalog.listStorageSnapshotLedger().length, 2, 'a dry run clears no ledger row');

      const actions = await huntStorageSnapshots(catalog, { systems: [system] });
      assert.deepEqual(actions.filter((action) => action.action !== 'removed'), [], JSON.stringify(actions));
      assert.deepEqual(sortedLocations(actions), goneLocations, 'the hunter removed the dead session\'s and the stray snapshot');
      assert.deepEqual(sortedLocations(await system.listOwnSnapshots([volume])), sortedLocations(live.info), "the live session's snapshot stays");
      assert.ok(await user.exists(), `the user's own snapshot ${user.location} survives the hunt`);
      assert.deepEqual(catalog.listStorageSnapshotLedger().map((entry) => entry.sessionTag), [liveTag], "the dead session's ledger row is cleared, the live one's kept");
      await assertPattern(live.imageAt(imagePath), 0, MiB, 0, "the live session's snapshot still reads");

      await live[Symbol.asyncDispose]();
      for (const entry of catalog.listStorageSnapshotLedger()) catalog.clearLedgerEntry(entry.id);
      await user.remove();
      // Already removed by the hunter: disposing them may fail (nothing is left to remove) and that is fine.
      for (const gone of [orphan, stray]) await Promise.resolve(gone[Symbol.asyncDispose]()).catch(() => undefined);
      await assertNothingOfOursOn([volume], 'after the hunt and the live session\'s end');
    });

    test('a deep, odd path: located, snapshotted at its instant, read back and removed', async () => {
      const imagePath = await bed.makeImage('deep.disk-0_v1', 2 * MiB, { deep: true });
      await bed.writePattern(imagePath, 0, MiB, 0x3c);
      const volume = await locateOrFail(imagePath);
      {
        await using snapshot = await bed.system().snapshot([volume], newTag(), [imagePath]);
        await bed.writePattern(imagePath, 0, MiB, 0xc3);
        await assertPattern(snapshot.imageAt(imagePath), 0, MiB, 0x3c, `the snapshot of ${imagePath}`);
        await assertPattern(bed.readablePath(imagePath), 0, MiB, 0xc3, `the live ${imagePath}`);
      }
      await assertNothingOfOursOn([volume], 'after disposal');
    });

    test('a vanished volume: the snapshot fails with STORAGE_SNAPSHOT_FAILED naming it, what was already taken is undone', async () => {
      const imagePath = await bed.makeImage('beside-vanished', MiB);
      const volume = await locateOrFail(imagePath);
      const vanishing = await bed.makeVanishingVolume();
      await vanishing.vanish();
      await assert.rejects(
        bed.system().snapshot(dedupe([volume, vanishing.volume]), newTag(), [imagePath, vanishing.imagePath]),
        (error: unknown) => {
          assert.ok(error instanceof SnapshiftError, `a SnapshiftError, not ${String(error)}`);
          assert.equal(error.code, 'STORAGE_SNAPSHOT_FAILED', error.message);
          assert.ok(error.message.includes(vanishing.name), `the message names ${vanishing.name}: ${error.message}`);
          assert.ok(!error.message.includes('\n'), `one line: ${error.message}`);
          return true;
        },
      );
      await assertNothingOfOursOn([volume], 'after the failed snapshot');
    });

    test('hunter: a ledger row naming a volume that vanished since does not stop the hunt on the others', async () => {
      const system = bed.system();
      const imagePath = await bed.makeImage('beside-vanishing', MiB);
      const volume = await locateOrFail(imagePath);
      const vanishing = await bed.makeVanishingVolume();
      const volumes = dedupe([volume, vanishing.volume]);
      const tag = recordIntent(volumes, await pidOfEndedProcess());
      await system.snapshot(volumes, tag, [imagePath, vanishing.imagePath]); // its session died before removal
      await vanishing.vanish();
      const actions = await huntStorageSnapshots(catalog, { systems: [system] });
      assert.deepEqual(actions.filter((action) => action.action !== 'removed'), [], JSON.stringify(actions));
      assert.deepEqual(catalog.listStorageSnapshotLedger(), [], 'the row is cleared');
      await assertNothingOfOursOn([volume], 'after the hunt');
    });
  });
}

/** A fresh session tag, as storage-snapshot mode makes them (the first 8 hex digits of the session id). */
function newTag(): string {
  return randomUUID().slice(0, 8);
}

function dedupe(volumes: readonly Volume[]): Volume[] {
  return [...new Map(volumes.map((volume) => [volume.id, volume])).values()];
}

function sortedLocations(items: ReadonlyArray<{ location: string }>): string[] {
  return items.map((item) => item.location).sort();
}

/** The PID of a process that has ended: the owner of a ledger row whose session is gone. */
async function pidOfEndedProcess(): Promise<number> {
  const child = spawn('true', { stdio: 'ignore' });
  await new Promise((resolve) => child.once('exit', resolve));
  assert.ok(child.pid);
  return child.pid;
}

/** A raw file of `sizeBytes` zeros (sparse). */
export async function makeRawFile(path: string, sizeBytes: number): Promise<void> {
  writeFileSync(path, '');
  const handle = await open(path, 'r+');
  try {
    await handle.truncate(sizeBytes);
  } finally {
    await handle.close();
  }
}

/** Writes `lengthBytes` of `byte` at `offsetBytes` of a file and waits for it to be on disk (fdatasync). */
export async function writeFilePattern(path: string, offsetBytes: number, lengthBytes: number, byte: number): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.write(Buffer.alloc(lengthBytes, byte), 0, lengthBytes, offsetBytes);
    await handle.datasync();
  } finally {
    await handle.close();
  }
}
