// What a product's devices may do once connected: MQTT topic filters they may publish and subscribe to,
// with `{udid}` standing for the device's own UDID. Stored as JSON in products.policy (null: the default).
//
//   { "mqtt": { "publish": ["devices/{udid}/#"], "subscribe": ["devices/{udid}/commands/#"] } }
//
// topicAllowed() implements MQTT 3.1.1 / 5 filter matching (§4.7) for a concrete topic name: '+' is one
// whole level, '#' the rest of the topic (including the parent level itself), and a filter starting with
// a wildcard never matches a topic starting with '$'. It walks the strings without splitting them.

import { HallmarkError } from '../errors.js';

export interface ProductPolicy {
  readonly mqtt: { readonly publish: readonly string[]; readonly subscribe: readonly string[] };
}

export interface Permissions {
  readonly publish: readonly string[];
  readonly subscribe: readonly string[];
}

export const DEFAULT_POLICY: ProductPolicy = Object.freeze({
  mqtt: Object.freeze({ publish: Object.freeze(['devices/{udid}/#']), subscribe: Object.freeze(['devices/{udid}/commands/#']) }),
});

/** Limits: the JSON text, filters per list, characters per filter. */
export const POLICY_LIMITS = { bytes: 16 * 1024, filters: 64, filterLength: 512 } as const;

const PLACEHOLDER = /\{([^{}]*)\}/g;

/** Parses and validates a stored or submitted policy; null / undefined / empty is the default policy. */
export function parsePolicy(text: string | null | undefined): ProductPolicy {
  if (text === null || text === undefined || text.trim() === '') return DEFAULT_POLICY;
  if (Buffer.byteLength(text, 'utf8') > POLICY_LIMITS.bytes) throw bad(`the policy is over ${POLICY_LIMITS.bytes} bytes`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw bad(`the policy is not JSON: ${(err as Error).message}`);
  }
  return validatePolicy(value);
}

/** Checks the shape of a policy object (as parsed from JSON). */
export function validatePolicy(value: unknown): ProductPolicy {
  if (!isPlainObject(value)) throw bad('the policy must be a JSON object {"mqtt": {"publish": [...], "subscribe": [...]}}');
  for (const k of Object.keys(value)) if (k !== 'mqtt') throw bad(`unknown policy field ${JSON.stringify(k)} (only "mqtt")`);
  const mqtt = value.mqtt;
  if (!isPlainObject(mqtt)) throw bad('policy.mqtt must be an object {"publish": [...], "subscribe": [...]}');
  for (const k of Object.keys(mqtt)) if (k !== 'publish' && k !== 'subscribe') throw bad(`unknown policy.mqtt field ${JSON.stringify(k)} (only "publish", "subscribe")`);
  const publish = filterList(mqtt.publish, 'policy.mqtt.publish');
  const subscribe = filterList(mqtt.subscribe, 'policy.mqtt.subscribe');
  return Object.freeze({ mqtt: Object.freeze({ publish, subscribe }) });
}

function filterList(value: unknown, where: string): readonly string[] {
  if (value === undefined) return Object.freeze([]);
  if (!Array.isArray(value)) throw bad(`${where} must be an array of topic filters`);
  if (value.length > POLICY_LIMITS.filters) throw bad(`${where} has ${value.length} filters, over the limit of ${POLICY_LIMITS.filters}`);
  value.forEach((f, i) => checkFilter(f, `${where}[${i}]`));
  return Object.freeze([...(value as string[])]);
}

/** A valid MQTT topic filter (with `{udid}` placeholders): throws BAD_REQUEST saying what is wrong. */
export function checkFilter(filter: unknown, where = 'topic filter'): void {
  if (typeof filter !== 'string') throw bad(`${where} must be a string`);
  if (filter.length === 0) throw bad(`${where} is empty`);
  if (filter.length > POLICY_LIMITS.filterLength) throw bad(`${where} is over ${POLICY_LIMITS.filterLength} characters`);
  if (filter.includes('\u0000')) throw bad(`${where} contains a NUL character`);
  for (const m of filter.matchAll(PLACEHOLDER)) if (m[1] !== 'udid') throw bad(`${where}: unknown placeholder {${m[1]}} (only {udid})`);
  if (filter.replace(PLACEHOLDER, '').includes('{') || filter.replace(PLACEHOLDER, '').includes('}')) throw bad(`${where}: unbalanced { } (the placeholder is {udid})`);
  const levels = filter.split('/');
  levels.forEach((level, i) => {
    if (level.includes('#') && (level !== '#' || i !== levels.length - 1)) throw bad(`${where}: '#' must be a whole level and the last one (${JSON.stringify(filter)})`);
    if (level.includes('+') && level !== '+') throw bad(`${where}: '+' must be a whole level (${JSON.stringify(filter)})`);
  });
}

/** The policy's filters with `{udid}` replaced: what this device may publish and subscribe to. */
export function permissionsFor(policy: ProductPolicy, udid: string): Permissions {
  const fill = (filters: readonly string[]) => Object.freeze(filters.map((f) => f.replaceAll('{udid}', udid)));
  return Object.freeze({ publish: fill(policy.mqtt.publish), subscribe: fill(policy.mqtt.subscribe) });
}

/** Whether the concrete topic name `topic` matches one of `filters`. A topic with wildcards, empty or with NUL is never allowed. */
export function topicAllowed(filters: readonly string[], topic: string): boolean {
  if (topic.length === 0 || topic.length > 65535) return false;
  for (let i = 0; i < topic.length; i++) {
    const c = topic.charCodeAt(i);
    if (c === 0x23 /* # */ || c === 0x2b /* + */ || c === 0) return false;
  }
  for (let i = 0; i < filters.length; i++) if (filterMatches(filters[i]!, topic)) return true;
  return false;
}

/** MQTT §4.7: does `filter` (valid, wildcards as whole levels) match the topic name `topic`? */
export function filterMatches(filter: string, topic: string): boolean {
  const fl = filter.length;
  const tl = topic.length;
  if (fl === 0) return false;
  const first = filter.charCodeAt(0);
  if (topic.charCodeAt(0) === 0x24 /* $ */ && (first === 0x23 || first === 0x2b)) return false;
  let fi = 0;
  let ti = 0;
  for (;;) {
    // The filter level [fi, fEnd) against the topic level [ti, tEnd).
    let fEnd = filter.indexOf('/', fi);
    if (fEnd < 0) fEnd = fl;
    if (fEnd - fi === 1 && filter.charCodeAt(fi) === 0x23) return true; // '#': the rest, whatever it is
    let tEnd = topic.indexOf('/', ti);
    if (tEnd < 0) tEnd = tl;
    if (!(fEnd - fi === 1 && filter.charCodeAt(fi) === 0x2b)) {
      if (fEnd - fi !== tEnd - ti) return false;
      for (let k = 0; k < fEnd - fi; k++) if (filter.charCodeAt(fi + k) !== topic.charCodeAt(ti + k)) return false;
    }
    const filterDone = fEnd === fl;
    const topicDone = tEnd === tl;
    if (filterDone) return topicDone;
    fi = fEnd + 1;
    if (topicDone) return fl - fi === 1 && filter.charCodeAt(fi) === 0x23; // "a/#" matches "a"
    ti = tEnd + 1;
  }
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function bad(message: string): HallmarkError {
  return new HallmarkError('BAD_REQUEST', message);
}
