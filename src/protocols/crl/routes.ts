// CRLs over plain HTTP (and HTTPS): GET /crl/NAME.crl (full, DER), /crl/NAME-delta.crl (delta, DER),
// /crl/NAME.pem and /crl/NAME-delta.pem (PEM, for humans). Parse and render only: the CrlPublisher
// decides what is current and makes it.
//
// Caching: Cache-Control public with a max-age never past the CRL's nextUpdate (and short for deltas,
// which change on every revocation), Last-Modified = thisUpdate, ETag = the CRL number; 304 on a
// matching If-None-Match or, without one, an If-Modified-Since not older than thisUpdate.

import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Authority } from '../../authority/authority.js';
import { CrlPublisher, type CrlKind, type CrlPublisherOptions, type CrlRecord } from '../../authority/crl-publisher.js';
import { HallmarkError } from '../../errors.js';
import { encodePem } from '../../pki/pem.js';

export interface CrlRouteOptions {
  /** Longest max-age for full CRLs, seconds. Default 3600. */
  readonly fullMaxAgeSeconds?: number;
  /** Longest max-age for delta CRLs, seconds. Default 60. */
  readonly deltaMaxAgeSeconds?: number;
  /** For the publisher made for this authority (first registration only). */
  readonly publisher?: CrlPublisherOptions;
}

interface Shared { readonly publisher: CrlPublisher; users: number }

// One publisher per authority, shared by the HTTP and HTTPS apps; stopped when the last app closes.
const publishers = new WeakMap<Authority, Shared>();

/** The publisher serving `authority`'s CRLs in this process, if any app registered CRL routes. */
export function crlPublisherOf(authority: Authority): CrlPublisher | undefined {
  return publishers.get(authority)?.publisher;
}

const FILE = /^([A-Za-z0-9][A-Za-z0-9._-]{0,62}?)(-delta)?\.(crl|pem)$/;

/** Registers the CRL routes on `app`, with the authority's shared CrlPublisher. */
export function registerCrlRoutes(app: FastifyInstance, authority: Authority, options: CrlRouteOptions = {}): void {
  let shared = publishers.get(authority);
  if (!shared) {
    shared = { publisher: new CrlPublisher(authority, { logger: app.log, ...options.publisher }), users: 0 };
    publishers.set(authority, shared);
  }
  shared.users++;
  const mine = shared;
  app.addHook('onClose', async () => {
    if (--mine.users > 0) return;
    if (publishers.get(authority) === mine) publishers.delete(authority);
    await mine.publisher.stop();
  });
  const fullMaxAge = options.fullMaxAgeSeconds ?? 3600;
  const deltaMaxAge = options.deltaMaxAgeSeconds ?? 60;

  app.get<{ Params: { file: string } }>('/crl/:file', { schema: { hide: true } }, async (request, reply) => {
    const m = FILE.exec(request.params.file);
    if (!m) throw new HallmarkError('NOT_FOUND', 'no such CRL (NAME.crl, NAME-delta.crl, NAME.pem or NAME-delta.pem)');
    const [, name, delta, ext] = m as unknown as [string, string, string | undefined, 'crl' | 'pem'];
    const kind: CrlKind = delta ? 'delta' : 'full';
    const crl = (await storedRootCrl(authority, name, kind)) ?? (await mine.publisher.current(name, kind));
    setCachingHeaders(reply, crl, kind === 'full' ? fullMaxAge : deltaMaxAge);
    if (notModified(request, crl)) return reply.status(304).send();
    if (ext === 'pem') return reply.type('application/x-pem-file').send(encodePem('X509 CRL', crl.der));
    return reply.type('application/pkix-crl').send(crl.der);
  });
}

/**
 * A root's CRL is signed offline (hallmark root revoke / root crl) and recorded by `hallmark root
 * install-crl`: served as installed, never made here. undefined when `name` is not a root.
 */
async function storedRootCrl(authority: Authority, name: string, kind: CrlKind): Promise<CrlRecord | undefined> {
  const ca = await authority.store.db.selectFrom('certificate_authorities').select(['id', 'role']).where('name', '=', name).executeTakeFirst();
  if (!ca || ca.role !== 'root') return undefined;
  if (kind === 'delta') throw new HallmarkError('NOT_FOUND', `the offline root ${name} publishes no delta CRL`);
  const row = await authority.store.db.selectFrom('crls').selectAll().where('ca_id', '=', ca.id).where('kind', '=', 'full').orderBy('number', 'desc').limit(1).executeTakeFirst();
  if (!row) throw new HallmarkError('NOT_FOUND', `no CRL of root ${name} has been installed: the root ceremony makes it (hallmark root revoke or root crl), then hallmark root install-crl`);
  return {
    ca: name, caId: ca.id, number: Number(row.number), kind: 'full', baseNumber: null, thisUpdate: new Date(row.this_update), nextUpdate: new Date(row.next_update),
    entries: Number(row.entries), der: Buffer.from(row.der),
  };
}

const etagOf = (crl: CrlRecord): string => `"${crl.number}"`;

function setCachingHeaders(reply: FastifyReply, crl: CrlRecord, maxAgeCap: number): void {
  const untilNext = Math.floor((crl.nextUpdate.getTime() - Date.now()) / 1000);
  const maxAge = Math.max(0, Math.min(maxAgeCap, untilNext));
  reply.header('cache-control', `public, max-age=${maxAge}, no-transform`);
  reply.header('last-modified', crl.thisUpdate.toUTCString());
  reply.header('etag', etagOf(crl));
  reply.header('expires', new Date(Date.now() + maxAge * 1000).toUTCString());
}

function notModified(request: FastifyRequest, crl: CrlRecord): boolean {
  const inm = request.headers['if-none-match'];
  if (inm !== undefined) {
    // RFC 9110 §13.1.2: weak comparison; "*" matches any current representation.
    const tags = String(inm).split(',').map((t) => t.trim().replace(/^W\//, ''));
    return tags.includes('*') || tags.includes(etagOf(crl));
  }
  const ims = request.headers['if-modified-since'];
  if (ims === undefined) return false;
  const since = Date.parse(String(ims));
  return Number.isFinite(since) && since >= crl.thisUpdate.getTime();
}
