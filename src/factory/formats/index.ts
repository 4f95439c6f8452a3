// The stamp formats, by name, and a sniffer for `hallmark stamp inspect` without --format.

import { HallmarkError } from '../../errors.js';
import type { StampFormat } from '../stamp.js';
import { jsonFormat } from './json.js';
import { nvsFormat } from './nvs.js';
import { tlvFormat } from './tlv.js';

export { batchSummaryCsvHeader, batchSummaryCsvLine } from './json.js';

export const STAMP_FORMATS: readonly StampFormat[] = [jsonFormat, tlvFormat, nvsFormat];

export const STAMP_FORMAT_NAMES = STAMP_FORMATS.map((f) => f.name);

/** The format called `name`; throws BAD_REQUEST listing the known ones otherwise. */
export function formatByName(name: string): StampFormat {
  const format = STAMP_FORMATS.find((f) => f.name === name.toLowerCase());
  if (!format) throw new HallmarkError('BAD_REQUEST', `unknown stamp format ${JSON.stringify(name)} (one of ${STAMP_FORMAT_NAMES.join(', ')})`);
  return format;
}

/** Parses a comma-separated list of format names ("json,tlv"), without duplicates. */
export function formatsByNames(list: string): StampFormat[] {
  const names = list.split(',').map((s) => s.trim()).filter(Boolean);
  if (names.length === 0) throw new HallmarkError('BAD_REQUEST', `no stamp format given (one or more of ${STAMP_FORMAT_NAMES.join(', ')})`);
  return [...new Set(names.map((n) => formatByName(n)))];
}

/** The format these bytes look like; throws STAMP_INVALID when none recognises them. */
export function sniffFormat(data: Buffer): StampFormat {
  const format = STAMP_FORMATS.find((f) => f.sniff(data));
  if (!format) {
    throw new HallmarkError('STAMP_INVALID', `not a stamp file: neither json (a "hallmark-stamp" object), tlv (magic "HMSTAMP") nor nvs (a "key,type,encoding,value" CSV); give --format to decode it as one`);
  }
  return format;
}
