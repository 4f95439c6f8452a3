// Registry routes of the admin API: products, lines, batches, devices, vendors, device issuance.
// Parse and render only: the Registry and the Authority decide.

import { createWriteStream } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { MANIFEST_FORMATS, importManifest, type ManifestFormat } from '../registry/manifests/import.js';
import { loadSigners } from '../registry/manifests/signers.js';
import type { Authority } from '../authority/authority.js';
import { addVendorCa, listVendorCas } from '../registry/birth-certificates.js';
import type { DeviceAction } from '../registry/registry.js';
import { publicKeyFromFile } from '../pki/public-key.js';
import { HallmarkError } from '../errors.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../pki/pem.js';
import type { DeviceState } from '../store/schema.js';

/** A manifest travels in one request body: 64 MiB (about 400,000 Microchip entries); larger ones go through the CLI. */
export const MANIFEST_BODY_LIMIT = 64 * 1024 * 1024;
/** A streamed manifest upload (the body is the file) is written to disk as it arrives, never held in memory: 8 GiB. */
export const MANIFEST_UPLOAD_LIMIT = 8 * 1024 * 1024 * 1024;
/** Content types of a streamed manifest upload (a Microchip manifest is JSON, but goes as octet-stream here). */
export const MANIFEST_UPLOAD_TYPES = ['application/octet-stream', 'text/csv', 'application/x-ndjson'];

/** A header of base64 values, comma-separated or repeated ("a, b" once Node has joined repeats). */
function base64Header(request: FastifyRequest, header: string): Buffer[] {
  const raw = request.headers[header];
  const values = (Array.isArray(raw) ? raw : raw === undefined ? [] : [raw]).flatMap((v) => v.split(',')).map((v) => v.trim()).filter(Boolean);
  return values.map((v, i) => {
    if (!/^[A-Za-z0-9+/_-]+={0,2}$/.test(v)) throw new HallmarkError('BAD_REQUEST', `${header} value ${i + 1} is not base64`);
    return Buffer.from(v, 'base64');
  });
}

const err = { type: 'object', properties: { error: { type: 'object', properties: { code: { type: 'string' }, message: { type: 'string' } } } } } as const;
const errors = { 400: err, 401: err, 403: err, 404: err, 409: err, 413: err, 500: err, 503: err };
const name = { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$' } as const;
const udidParam = { type: 'object', properties: { udid: { type: 'string', pattern: '^[0-9a-fA-F:]{2,95}$' } }, required: ['udid'] } as const;
const anyObject = { type: 'object', additionalProperties: true } as const;
const listOf = (items: object) => ({ type: 'object', properties: { items: { type: 'array', items }, next: { type: ['string', 'null'] } } });

const deviceSchema = {
  type: 'object',
  properties: {
    udid: { type: 'string' }, serialNumber: { type: ['string', 'null'] }, state: { type: 'string' }, product: { type: 'string' }, line: { type: 'string' },
    batch: { type: 'string' }, tenant: { type: 'string' }, publicKeySha256: { type: 'string' }, hasBirthCertificate: { type: 'boolean' },
    createdAt: { type: 'string' }, updatedAt: { type: 'string' }, provisionedAt: { type: ['string', 'null'] },
  },
} as const;

const actorOf = (request: FastifyRequest): string => `token:${request.principal?.tokenId ?? '?'}`;

export function registerRegistryApi(app: FastifyInstance, authority: Authority): void {
  const registry = authority.registry;
  const read = { scope: 'registry:read' as const };
  const write = { scope: 'registry:write' as const };

  app.get('/api/v1/products', { config: read, schema: { summary: 'List products', tags: ['registry'], response: { 200: listOf(anyObject), ...errors } } },
    async () => ({ items: await registry.listProducts(), next: null }));

  app.post<{ Body: { name: string; profile?: string; validityDays?: number; allowServerKeygen?: boolean; allowRekey?: boolean; renewAfterPercent?: number } }>('/api/v1/products', {
    config: write,
    schema: { summary: 'Create a product', tags: ['registry'], body: { type: 'object', additionalProperties: false, required: ['name'], properties: { name, profile: { type: 'string', maxLength: 64 }, validityDays: { type: 'integer', minimum: 1, maximum: 10950 }, allowServerKeygen: { type: 'boolean' }, allowRekey: { type: 'boolean' }, renewAfterPercent: { type: 'integer', minimum: 0, maximum: 99 } } }, response: { 201: anyObject, ...errors } },
  }, async (request, reply) => {
    await registry.createProduct({ ...request.body, actor: actorOf(request) });
    return reply.status(201).send((await registry.listProducts()).find((p) => p.name === request.body.name));
  });

  app.get('/api/v1/lines', { config: read, schema: { summary: 'List production lines', tags: ['registry'], response: { 200: listOf(anyObject), ...errors } } },
    async () => ({ items: await registry.listLines(), next: null }));

  app.post<{ Body: { name: string; ca: string } }>('/api/v1/lines', {
    config: write,
    schema: { summary: 'Create a production line issuing under an existing intermediate CA', tags: ['registry'], body: { type: 'object', additionalProperties: false, required: ['name', 'ca'], properties: { name, ca: name } }, response: { 201: anyObject, ...errors } },
  }, async (request, reply) => {
    await registry.createLine({ ...request.body, actor: actorOf(request) });
    return reply.status(201).send((await registry.listLines()).find((l) => l.name === request.body.name));
  });

  app.get('/api/v1/batches', { config: read, schema: { summary: 'List batches with quota and counts', tags: ['registry'], response: { 200: listOf(anyObject), ...errors } } },
    async () => ({ items: await registry.listBatches(), next: null }));

  app.get<{ Params: { id: string } }>('/api/v1/batches/:id', { config: read, schema: { summary: 'One batch', tags: ['registry'], params: { type: 'object', properties: { id: { type: 'string', maxLength: 64 } }, required: ['id'] }, response: { 200: anyObject, ...errors } } },
    async (request) => registry.batch(request.params.id));

  app.post<{ Body: { product: string; line: string; quota: number; expiresAt?: string; allowUnregistered?: boolean; requireApproval?: boolean } }>('/api/v1/batches', {
    config: write,
    schema: {
      summary: 'Create a batch', tags: ['registry'],
      body: { type: 'object', additionalProperties: false, required: ['product', 'line', 'quota'], properties: { product: name, line: name, quota: { type: 'integer', minimum: 0, maximum: 100000000 }, expiresAt: { type: 'string', format: 'date-time' }, allowUnregistered: { type: 'boolean' }, requireApproval: { type: 'boolean' } } },
      response: { 201: anyObject, ...errors },
    },
  }, async (request, reply) => {
    const b = request.body;
    const id = await registry.createBatch({ product: b.product, line: b.line, quota: b.quota, expiresAt: b.expiresAt ? new Date(b.expiresAt) : undefined, allowUnregistered: b.allowUnregistered, requireApproval: b.requireApproval, actor: actorOf(request) });
    return reply.status(201).send(await registry.batch(id));
  });

  app.post<{ Params: { id: string }; Body: { publicKey: string; udid?: string; serialNumber?: string; birthCertificate?: string; tenant?: string } }>('/api/v1/batches/:id/devices', {
    config: write,
    schema: {
      summary: 'Register a device in a batch', tags: ['registry'],
      params: { type: 'object', properties: { id: { type: 'string', maxLength: 64 } }, required: ['id'] },
      body: { type: 'object', additionalProperties: false, required: ['publicKey'], properties: {
        publicKey: { type: 'string', maxLength: 16384, description: 'PEM or base64 DER SubjectPublicKeyInfo' }, udid: { type: 'string', maxLength: 95 },
        serialNumber: { type: 'string', maxLength: 64 }, birthCertificate: { type: 'string', maxLength: 65536, description: 'PEM or base64 DER' }, tenant: name,
      } },
      response: { 201: deviceSchema, ...errors },
    },
  }, async (request, reply) => {
    const b = request.body;
    const spki = publicKeyFromFile(Buffer.from(b.publicKey.includes('-----BEGIN') ? b.publicKey : `-----BEGIN PUBLIC KEY-----\n${b.publicKey}\n-----END PUBLIC KEY-----\n`));
    const birthCertificate = b.birthCertificate ? decodeOne(b.birthCertificate, ['CERTIFICATE'], SIZE_LIMITS.certificate) : undefined;
    const device = await registry.registerDevice(request.params.id, { publicKeySpki: spki, udid: b.udid, serialNumber: b.serialNumber, birthCertificate, tenant: b.tenant }, actorOf(request));
    return reply.status(201).send(device);
  });

  app.get<{ Querystring: { batch?: string; state?: DeviceState; tenant?: string; after?: string; limit?: number } }>('/api/v1/devices', {
    config: read,
    schema: {
      summary: 'List devices in pages (pass `next` as `after` for the following page)', tags: ['registry'],
      querystring: { type: 'object', additionalProperties: false, properties: {
        batch: { type: 'string', maxLength: 64 }, state: { type: 'string', enum: ['registered', 'provisioned', 'active', 'suspended', 'revoked', 'decommissioned'] },
        tenant: name, after: { type: 'string', maxLength: 95 }, limit: { type: 'integer', minimum: 1, maximum: 1000 },
      } },
      response: { 200: listOf(deviceSchema), ...errors },
    },
  }, async (request) => registry.listDevices(request.query));

  app.get<{ Params: { udid: string } }>('/api/v1/devices/:udid', { config: read, schema: { summary: 'One device', tags: ['registry'], params: udidParam, response: { 200: deviceSchema, ...errors } } },
    async (request) => registry.device(request.params.udid));

  app.post<{ Params: { udid: string }; Body: { tenant: string } }>('/api/v1/devices/:udid/transfer', {
    config: write,
    schema: { summary: 'Transfer a device to another tenant', tags: ['registry'], params: udidParam, body: { type: 'object', additionalProperties: false, required: ['tenant'], properties: { tenant: name } }, response: { 200: deviceSchema, ...errors } },
  }, async (request) => registry.transfer(request.params.udid, request.body.tenant, actorOf(request)));

  for (const action of ['suspend', 'resume', 'decommission'] as const satisfies readonly DeviceAction[]) {
    app.post<{ Params: { udid: string } }>(`/api/v1/devices/:udid/${action}`, {
      config: write,
      schema: { summary: `${action[0]!.toUpperCase()}${action.slice(1)} a device`, tags: ['registry'], params: udidParam, response: { 200: deviceSchema, ...errors } },
    }, async (request) => registry.changeState(request.params.udid, action, actorOf(request)));
  }

  app.post<{ Params: { udid: string }; Body: { csr: string } }>('/api/v1/devices/:udid/certificates', {
    config: { scope: 'certificates:issue' },
    schema: {
      summary: 'Issue an operational certificate to a registered device (state, key and quota checked; subject from the registry)', tags: ['registry', 'certificates'],
      params: udidParam, body: { type: 'object', additionalProperties: false, required: ['csr'], properties: { csr: { type: 'string', maxLength: 131072 } } },
      response: { 201: anyObject, ...errors },
    },
  }, async (request, reply) => {
    const cert = await authority.issueForDevice({ udid: request.params.udid, csr: request.body.csr, actor: actorOf(request) });
    return reply.status(201).send({
      serial: cert.serial, issuer: cert.issuer, profile: cert.profile, subject: cert.subject, notBefore: cert.notBefore.toISOString(), notAfter: cert.notAfter.toISOString(),
      fingerprintSha256: cert.fingerprintSha256, certificate: encodePem('CERTIFICATE', cert.der), chain: cert.chain.slice(0, -1).map((d) => encodePem('CERTIFICATE', d)).join(''),
    });
  });

  // Manifest import: the manifest (and, for a generic list, its detached signature) travel in the JSON
  // body; they are written to a private temporary file so the importer can stream them as it does from the CLI.
  app.post<{ Params: { id: string }; Body: { manifest: string; encoding?: 'utf8' | 'base64'; signature?: string; trust: string[]; format?: ManifestFormat; skipInvalid?: boolean; ignoreBirthCertificates?: boolean } }>('/api/v1/batches/:id/manifests', {
    config: write,
    bodyLimit: MANIFEST_BODY_LIMIT,
    schema: {
      summary: 'Import a signed chip manifest into a batch (verified before anything is stored; atomic; idempotent)', tags: ['registry'],
      params: { type: 'object', properties: { id: { type: 'string', maxLength: 64 } }, required: ['id'] },
      body: { type: 'object', additionalProperties: false, required: ['manifest', 'trust'], properties: {
        manifest: { type: 'string', description: 'the manifest file content' }, encoding: { type: 'string', enum: ['utf8', 'base64'] },
        signature: { type: 'string', maxLength: 4096, description: 'base64 detached signature (generic CSV / NDJSON lists)' },
        trust: { type: 'array', minItems: 1, maxItems: 16, items: { type: 'string', maxLength: 65536 }, description: 'PEM signer certificates or public keys' },
        format: { type: 'string', enum: [...MANIFEST_FORMATS] }, skipInvalid: { type: 'boolean' }, ignoreBirthCertificates: { type: 'boolean' },
      } },
      response: { 201: anyObject, 200: anyObject, ...errors },
    },
  }, async (request, reply) => {
    const b = request.body;
    const signers = b.trust.flatMap((pem, i) => loadSigners(Buffer.from(pem), `trust[${i}]`));
    const dir = await mkdtemp(join(tmpdir(), 'hallmark-manifest-'));
    try {
      const file = join(dir, 'manifest');
      await writeFile(file, Buffer.from(b.manifest, b.encoding === 'base64' ? 'base64' : 'utf8'), { mode: 0o600 });
      let signatureFile: string | undefined;
      if (b.signature) {
        signatureFile = join(dir, 'manifest.sig');
        await writeFile(signatureFile, b.signature, { mode: 0o600 });
      }
      const report = await importManifest(authority.store, {
        file, batch: request.params.id, signers, format: b.format, signatureFile, skipInvalid: b.skipInvalid,
        ignoreBirthCertificates: b.ignoreBirthCertificates, actor: actorOf(request),
      });
      return reply.status(report.registered + report.reRegistered > 0 ? 201 : 200).send({ ...report, file: undefined });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  // Streamed manifest upload: the request body is the manifest file itself (no size limit but
  // MANIFEST_UPLOAD_LIMIT), written to a private temporary file as it arrives, then imported exactly as
  // from the CLI (which streams it again, in flat memory). The signers and the detached signature travel
  // in headers; the body is read only after the token has been checked (preHandler), since the
  // content-type parser below hands the stream on without reading it.
  void app.register(async (scope) => {
    scope.addContentTypeParser(MANIFEST_UPLOAD_TYPES, (_request, payload, done) => done(null, payload));
    scope.post<{ Params: { id: string }; Querystring: { format?: ManifestFormat; skipInvalid?: boolean; ignoreBirthCertificates?: boolean } }>('/api/v1/batches/:id/manifests/upload', {
      config: write,
      schema: {
        summary: 'Import a signed chip manifest sent as the raw request body (any size; streamed to disk, never buffered)', tags: ['registry'],
        description: 'Body: the manifest file (Content-Type application/octet-stream, text/csv or application/x-ndjson). Headers: Hallmark-Trust, the base64 of each '
          + 'signer PEM (certificate or public key), comma-separated or repeated; Hallmark-Signature, the base64 detached signature of a CSV / NDJSON list.',
        params: { type: 'object', properties: { id: { type: 'string', maxLength: 64 } }, required: ['id'] },
        querystring: { type: 'object', additionalProperties: false, properties: { format: { type: 'string', enum: [...MANIFEST_FORMATS] }, skipInvalid: { type: 'boolean' }, ignoreBirthCertificates: { type: 'boolean' } } },
        response: { 201: anyObject, 200: anyObject, ...errors },
      },
    }, async (request, reply) => {
      const body = request.body as NodeJS.ReadableStream | undefined;
      if (!body || typeof (body as { pipe?: unknown }).pipe !== 'function') {
        throw new HallmarkError('BAD_REQUEST', `send the manifest itself as the body, with Content-Type ${MANIFEST_UPLOAD_TYPES.join(', ')} (or use POST /api/v1/batches/{id}/manifests with a JSON body)`);
      }
      const trust = base64Header(request, 'hallmark-trust');
      if (trust.length === 0 || trust.length > 16) throw new HallmarkError('BAD_REQUEST', 'give 1 to 16 manifest signers in the Hallmark-Trust header: the base64 of each PEM certificate or public key');
      const signers = trust.flatMap((pem, i) => loadSigners(pem, `Hallmark-Trust ${i + 1}`));
      const signature = base64Header(request, 'hallmark-signature');
      if (signature.length > 1 || (signature[0] && signature[0].length > 4096)) throw new HallmarkError('BAD_REQUEST', 'Hallmark-Signature is one base64 detached signature');
      const dir = await mkdtemp(join(tmpdir(), 'hallmark-manifest-'));
      try {
        const file = join(dir, 'manifest');
        let received = 0;
        const limit = new Transform({
          transform(chunk: Buffer, _encoding, callback) {
            received += chunk.length;
            if (received > MANIFEST_UPLOAD_LIMIT) callback(new HallmarkError('INPUT_TOO_LARGE', `the manifest is larger than ${MANIFEST_UPLOAD_LIMIT / 1024 ** 3} GiB`));
            else callback(null, chunk);
          },
        });
        await pipeline(body, limit, createWriteStream(file, { mode: 0o600 }));
        if (received === 0) throw new HallmarkError('MANIFEST_INVALID', 'the request body (the manifest) is empty');
        let signatureFile: string | undefined;
        if (signature[0]) {
          signatureFile = join(dir, 'manifest.sig');
          await writeFile(signatureFile, signature[0], { mode: 0o600 });
        }
        const q = request.query;
        const report = await importManifest(authority.store, {
          file, batch: request.params.id, signers, format: q.format, signatureFile, skipInvalid: q.skipInvalid,
          ignoreBirthCertificates: q.ignoreBirthCertificates, actor: actorOf(request),
        });
        return reply.status(report.registered + report.reRegistered > 0 ? 201 : 200).send({ ...report, file: undefined });
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });
  });

  app.get('/api/v1/vendors', { config: read, schema: { summary: 'The vendor trust store for birth certificates', tags: ['registry'], response: { 200: listOf(anyObject), ...errors } } },
    async () => ({ items: await listVendorCas(authority.store.db), next: null }));

  app.post<{ Body: { name: string; ca: string } }>('/api/v1/vendors', {
    config: write,
    schema: { summary: 'Trust vendor CA certificate(s) (PEM)', tags: ['registry'], body: { type: 'object', additionalProperties: false, required: ['name', 'ca'], properties: { name, ca: { type: 'string', maxLength: 524288 } } }, response: { 201: anyObject, ...errors } },
  }, async (request, reply) => {
    const added = await addVendorCa(authority.store, { vendor: request.body.name, pem: request.body.ca, actor: actorOf(request) });
    return reply.status(201).send({ vendor: request.body.name, added });
  });

}
