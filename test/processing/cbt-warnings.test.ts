import { test } from 'node:test';
import assert from 'node:assert/strict';
import { planQemuChangedBlocks } from '../../src/hypervisor/qemu/qemu-cbt.ts';
import { bitmapChainKeyOf, cbtInputOf } from '../../src/processing/cbt-chain-key.ts';
import { bitmapNameFor } from '../../src/hypervisor/qemu/dirty-bitmaps.ts';
import type { VmDisk } from '../../src/hypervisor/hypervisor.ts';
import type { QmpSession } from '../../src/hypervisor/qemu/qmp-session.ts';
import { SnapshiftError } from '../../src/core/errors.ts';
import { initRepository, openRepository } from '../../src/repository/index.ts';
import { tempDir } from '../repository/helpers.ts';

const disk: VmDisk = { name: 'vda', nodeName: 'vda-node', imagePath: '/vms/vm1.qcow2', format: 'qcow2', protocol: 'file', virtualSizeBytes: 1024 * 1024, actualSizeBytes: undefined };

/** A QEMU whose node holds `bitmaps` and that refuses to remove or revert any of them. */
function refusingQmp(bitmaps: () => string[]): QmpSession & { refused: string[] } {
  const refused: string[] = [];
  return {
    refused,
    async execute<T>(command: string): Promise<T> {
      if (command === 'query-named-block-nodes') {
        return [{ 'node-name': disk.nodeName, 'dirty-bitmaps': bitmaps().map((name) => ({ name, recording: true, persistent: true })) }] as T;
      }
      refused.push(command);
      throw new SnapshiftError('QMP_COMMAND_FAILED', `QMP command ${command} failed: GenericError: Bitmap is busy`);
    },
    waitForEvent: () => Promise.reject(new Error('not used')),
    close: () => Promise.resolve(),
  };
}

test('dirty bitmaps that cannot be cleaned up come back as the task\'s warnings, not as a process warning', async () => {
  await using dir = await tempDir();
  await initRepository(dir.path, { encryption: false, chunkSizeBytes: 256 * 1024 });
  await using repository = await openRepository(dir.path, {});
  const chainKey = bitmapChainKeyOf(repository);
  const previousBitmap = bitmapNameFor(chainKey, 'aaaaaaaa');
  const writer = await repository.startBackup({ vmName: 'vm1' });
  writer.addDisk(disk.name, disk.virtualSizeBytes);
  await writer.commit({ cbt: { disks: { [disk.name]: { bitmap: previousBitmap, virtualSizeBytes: disk.virtualSizeBytes, imagePath: disk.imagePath } } } });

  const emitted: string[] = [];
  const onWarning = (warning: Error) => emitted.push(warning.message);
  process.on('warning', onWarning);
  try {
    for (const succeeded of [true, false]) {
      const newBitmap = bitmapNameFor(chainKey, 'bbbbbbbb');
      let onNode = [previousBitmap];
      const qmp = refusingQmp(() => onNode);
      const input = await cbtInputOf(repository, 'vm1', { tag: 'bbbbbbbb', runDir: dir.path });
      const plan = await planQemuChangedBlocks(qmp, 'vm1', [disk], { ...input, exportWithBitmap: () => Promise.reject(new Error('not used')) });
      assert.equal(plan.readPlans.get(disk.name)?.kind, 'changed', 'the previous bitmap is trusted');
      onNode = [previousBitmap, newBitmap]; // the VM snapshot's transaction rotated them
      const warnings = await plan.finish(succeeded);
      assert.equal(warnings.length, 1, JSON.stringify(warnings));
      assert.match(warnings[0]!, /^dirty bitmaps of vm1 not cleaned up: QMP command (block-dirty-bitmap-remove|transaction) failed: GenericError: Bitmap is busy$/);
      assert.ok(qmp.refused.length > 0);
      assert.deepEqual(await plan.finish(succeeded), [], 'finishing twice does nothing');
    }
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(emitted, [], 'nothing goes to process.emitWarning');
  } finally {
    process.off('warning', onWarning);
  }
});
