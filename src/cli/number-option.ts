import { SnapshiftError } from '../core/errors.ts';

/** What a number on the command line must be; by default a whole number ≥ 1. */
export interface NumberRule {
  /** Whole numbers only (default true); otherwise decimals like 0.5 are allowed too. */
  integer?: boolean;
  /** Smallest allowed value, inclusive (default 1). */
  min?: number;
  /** Values must be above this (exclusive), e.g. a percentage that cannot be 0. */
  above?: number;
  /** Largest allowed value, inclusive. */
  max?: number;
  /** Unit shown in the message, e.g. "MB/s". */
  unit?: string;
}

/**
 * The one validator for numbers given on the command line: plain decimal digits only (no "", "0x10", "1e3"
 * or " 5"), within the rule's bounds; anything else is a usage error (exit 64) naming the option.
 */
export function parseCliNumber(text: string, option: string, rule: NumberRule = {}): number {
  const integer = rule.integer ?? true;
  const min = rule.above === undefined ? (rule.min ?? 1) : rule.min;
  const value = (integer ? /^-?\d+$/ : /^-?(\d+(\.\d*)?|\.\d+)$/).test(text) ? Number(text) : Number.NaN;
  const fits = Number.isFinite(value) && (min === undefined || value >= min) && (rule.above === undefined || value > rule.above) && (rule.max === undefined || value <= rule.max);
  if (!fits) throw new SnapshiftError('USAGE', `${option} must be ${describe(integer, min, rule)}, not "${text}"`);
  return value;
}

/** `parseCliNumber` as a commander argument parser: `.option('--limit <n>', '…', numberOption('--limit'))`. */
export function numberOption(option: string, rule: NumberRule = {}): (text: string) => number {
  return (text) => parseCliNumber(text, option, rule);
}

function describe(integer: boolean, min: number | undefined, rule: NumberRule): string {
  const kind = integer ? 'a whole number' : 'a number';
  const bounds = [
    ...(rule.above !== undefined ? [`above ${rule.above}`] : min !== undefined ? [`≥ ${min}`] : []),
    ...(rule.max !== undefined ? [`≤ ${rule.max}`] : []),
  ];
  return `${kind}${bounds.length > 0 ? ` ${bounds.join(' and ')}` : ''}${rule.unit ? ` (${rule.unit})` : ''}`;
}
