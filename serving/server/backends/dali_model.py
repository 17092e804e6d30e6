"""Triton Python-backend model: the serialized DALI preprocessing on the CPU.

Copied by ``patchserve export`` into ``REPO/NAME_preprocess/1/model.py`` beside
``model.dali``; the embedded server has no DALI backend, so this runs the very
same serialized pipeline with DALI's CPU operators (``device_id=None``).

Encoded bytes on the wire: input ``TYPE_UINT8`` with dims ``[-1]`` and
``allow_ragged_batch`` (the DALI backend's convention for encoded images), so
a request carries shape ``[1, nbytes]`` for one file. A request may carry
several files as ``[n, nbytes]`` when they are zero-padded to one length.
Each request row is one image; the output is uint8 HWC at the classifier's
input size. A request with an image that cannot be used fails alone, with
the image's row and the reason; the other requests are answered.

Hostile bytes. DALI 2.4's CPU image decoder has a fault on its error path:
when one image of a batch fails to decode, the error is raised while the
batch's other decoding tasks still run on the pipeline's thread pool, and
they write into memory that is then freed. The process segfaults a moment
later, often while a replacement pipeline is being built, so no rebuild in
the same process holds (the 0.1.0 release of this file did exactly that, and
its stub died). Hence two defences, and the second holds when the first
misses:

1. Each image is checked before DALI sees it: its header is read (format,
   mode, ``max_image_pixels``), its structure walked (PNG chunks with their
   CRCs to IEND, JPEG markers to EOI; a copy of serving/core/encoded.py,
   which this file cannot import) and it is decoded once by PIL. An
   image that fails gets its own reason and never reaches DALI; DALI gets
   the file without its padding.
2. DALI runs in a child process, never in the stub. The child runs batches
   and, after any DALI error, answers it and exits: a process whose decoder
   failed is not trusted again. If a batch fails or the child dies, each
   request is run again alone in a new child, so only the request whose
   image the decoder refuses fails. The child dies with the stub.
"""

import io
import json
import os
import pickle
import select
import struct
import subprocess
import sys
import time
import zlib

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # the DALI child process runs this file without Triton
    pb_utils = None

STARTUP_TIMEOUT_S = 300.0  # importing DALI and building the pipeline, on a busy machine
RUN_TIMEOUT_S = 120.0  # one batch; a decoder that hangs longer is killed
# How the child starts: nothing from the model folder or the working directory can shadow a module.
_BOOT = ("import sys; del sys.path[0]; path = sys.argv[1]; ns = {'__name__': '__dali_child__', '__file__': path}; "
         "exec(compile(open(path).read(), path, 'exec'), ns); ns['child_main']()")


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.batch_size = max(1, int(self.model_config.get("max_batch_size", 1)))
        self.input_name = self.model_config["input"][0]["name"]
        self.output_name = self.model_config["output"][0]["name"]
        self.max_pixels = int(params.get("max_image_pixels", "0") or 0)  # 0: no limit
        self.decoder = DaliProcess({
            "dali_path": os.path.join(version_dir, params.get("dali_file", "model.dali")),
            "num_threads": max(1, int(params.get("dali_threads", "1") or 1)),
            "batch_size": self.batch_size, "input_name": self.input_name})
        self.decoder.start()  # a DALI that cannot load fails the model's load, not its first request

    def finalize(self):
        self.decoder.close()

    def execute(self, requests):
        checked = []  # per request: (files without padding, None) or (None, why it is refused)
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            data = data.reshape(1, -1) if data.ndim == 1 else data.reshape(data.shape[0], -1)
            checked.append(check_request(data, self.max_pixels))
        answers = [None] * len(requests)  # an array of images or (error code, message)
        for i, (files, why) in enumerate(checked):
            if why is not None:
                answers[i] = ("INVALID_ARG", why)
        todo = [i for i, a in enumerate(answers) if a is None]
        if todo:
            try:
                flat = self.decoder.run([f for i in todo for f in checked[i][0]])
                start = 0
                for i in todo:
                    n = len(checked[i][0])
                    answers[i] = np.stack(flat[start:start + n])
                    start += n
                todo = []
            except DecoderFailed:
                pass  # the child is gone; each request again, alone, so only the bad one fails
        for i in todo:
            try:
                answers[i] = np.stack(self.decoder.run(checked[i][0]))
            except DecoderFailed as exc:
                answers[i] = (exc.code, f"cannot decode the image bytes: {exc}")
        return [self._response(a) for a in answers]

    def _response(self, answer):
        if isinstance(answer, tuple):
            code, message = answer
            return pb_utils.InferenceResponse(output_tensors=[],
                                              error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, answer)])


# -- checks before DALI ------------------------------------------------------------------------------------

def check_request(rows, max_pixels):
    """``(files, None)``: each row's file without its padding; or ``(None, why)`` for the first bad row."""
    files = []
    for i, row in enumerate(rows):
        data = np.ascontiguousarray(row, dtype=np.uint8).tobytes()
        why, end = check_image(data, i, max_pixels)
        if why is not None:
            return None, why
        files.append(data[:end])
    return files, None


def check_image(data, i, max_pixels):
    """``(why, None)`` when image ``i`` must not reach DALI (too large, a mode DALI decodes otherwise,
    truncated or corrupt), else ``(None, end)``: where the file ends in its padded row. The header
    comes first, so an over-limit image is refused for its size and never decoded."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the limit below, with its own message, replaces PIL's
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad header
        return f"cannot decode the image bytes: image {i} has no header PIL can read ({type(exc).__name__})", None
    with img:
        (w, h), fmt = img.size, img.format
        if max_pixels and w * h > max_pixels:
            return (f"image {i}: image too large: {w}x{h} = {w * h} pixels is over the limit of "
                    f"{max_pixels} (max_image_pixels)"), None
        if img.format not in ("PNG", "JPEG") or img.mode not in ("RGB", "L"):
            # DALI would not apply patchserve's decode rule to alpha, palette, 16-bit or CMYK images.
            return f"image {i}: expected an RGB or grey PNG or JPEG, got a {img.mode} {img.format}", None
    try:
        end = encoded_end(data)
    except EncodedFileError as exc:
        return f"cannot decode the image bytes: image {i}: {exc}", None
    try:
        with Image.open(io.BytesIO(data[:end])) as img:
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))  # every byte decoded, at an eighth
            img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error
        return f"cannot decode the image bytes: image {i}: the {fmt} data is corrupt ({_short(exc)})", None
    return None, end


# A copy of serving/core/encoded.py's walk: this file runs in the server without patchserve, so it cannot
# import it (tests/unit/test_encoded_walk.py holds the two to one answer and message).
# pylint: disable=duplicate-code
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_RST = frozenset(range(0xD0, 0xD8))


class EncodedFileError(ValueError):
    """An encoded PNG or JPEG is truncated or corrupt; the message says what and at which byte."""


def encoded_end(data):
    """``end`` of the whole PNG or JPEG at the start of ``data`` (past IEND's CRC or EOI)."""
    if data.startswith(PNG_SIGNATURE):
        return png_end(data)
    if data.startswith(JPEG_SOI):
        return jpeg_end(data)
    raise EncodedFileError("not a PNG or JPEG file (no PNG signature, no JPEG start-of-image marker)")


def png_end(data):
    n = len(data)
    pos = len(PNG_SIGNATURE)
    index, seen_idat, idat_closed = 0, False, False
    while True:
        if pos + 8 > n:
            raise EncodedFileError(f"PNG truncated at byte {n}: no IEND chunk (the file ends before "
                                   f"the chunk header at byte {pos})")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        name = ctype.decode("latin-1")
        if not ctype.isalpha():
            raise EncodedFileError(f"PNG corrupt: chunk at byte {pos} has no valid type ({ctype!r})")
        if length > 0x7FFFFFFF:
            raise EncodedFileError(f"PNG corrupt: chunk {name} at byte {pos} claims {length} bytes")
        end = pos + 12 + length
        if end > n:
            raise EncodedFileError(f"PNG truncated at byte {n}: chunk {name} at byte {pos} needs "
                                   f"{end - n} more bytes")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:end])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise EncodedFileError(f"PNG corrupt: CRC mismatch in chunk {name} at byte {pos}")
        if index == 0:
            if ctype != b"IHDR":
                raise EncodedFileError(f"PNG corrupt: the first chunk is {name}, not IHDR")
            _check_ihdr(body)
        elif ctype == b"IHDR":
            raise EncodedFileError(f"PNG corrupt: a second IHDR chunk at byte {pos}")
        if ctype == b"IDAT":
            if idat_closed:
                raise EncodedFileError(f"PNG corrupt: IDAT chunks are not consecutive (another at byte {pos})")
            seen_idat = True
        elif seen_idat:
            idat_closed = True
        if ctype == b"IEND":
            if not seen_idat:
                raise EncodedFileError("PNG corrupt: no IDAT chunk (no image data) before IEND")
            if length:
                raise EncodedFileError(f"PNG corrupt: IEND chunk at byte {pos} is not empty")
            return end
        pos, index = end, index + 1


def _check_ihdr(body):
    if len(body) != 13:
        raise EncodedFileError(f"PNG corrupt: IHDR holds {len(body)} bytes, not 13")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if not (0 < width <= 0x7FFFFFFF and 0 < height <= 0x7FFFFFFF):
        raise EncodedFileError(f"PNG corrupt: IHDR gives a size of {width}x{height}")
    if depth not in _PNG_DEPTHS.get(colour, ()):
        raise EncodedFileError(f"PNG corrupt: IHDR gives bit depth {depth} with colour type {colour}")
    if compression or filtering or interlace not in (0, 1):
        raise EncodedFileError(f"PNG corrupt: IHDR gives compression {compression}, filter {filtering}, "
                               f"interlace {interlace}")


def jpeg_end(data):
    n = len(data)
    pos = len(JPEG_SOI)
    frame, scans = False, 0
    while True:
        if pos >= n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: no end-of-image marker (EOI)")
        if data[pos] != 0xFF:
            raise EncodedFileError(f"JPEG corrupt: byte {pos} is 0x{data[pos]:02X} where a marker should start")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: no end-of-image marker (EOI)")
        marker, at = data[pos], pos - 1
        pos += 1
        if marker == 0xD9:
            if not frame or not scans:
                raise EncodedFileError(f"JPEG corrupt: end-of-image at byte {at} before any "
                                       f"{'scan' if frame else 'frame header'}")
            return pos
        if marker in _RST or marker in (0x00, 0x01, 0xD8):
            raise EncodedFileError(f"JPEG corrupt: unexpected marker 0xFF{marker:02X} at byte {at}")
        if pos + 2 > n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: segment 0xFF{marker:02X} at byte {at} has no length")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            raise EncodedFileError(f"JPEG corrupt: segment 0xFF{marker:02X} at byte {at} has length {length}")
        if pos + length > n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: segment 0xFF{marker:02X} at byte {at} needs "
                                   f"{pos + length - n} more bytes")
        body = data[pos + 2:pos + length]
        pos += length
        if marker in _SOF:
            _check_sof(body, at, frame)
            frame = True
        elif marker == 0xC4:
            _check_dht(body, at)
        elif marker == 0xDB:
            _check_dqt(body, at)
        elif marker == 0xDA:
            if not frame:
                raise EncodedFileError(f"JPEG corrupt: a scan at byte {at} before any frame header (SOF)")
            if not body or len(body) != 4 + 2 * body[0] or not 1 <= body[0] <= 4:
                raise EncodedFileError(f"JPEG corrupt: scan header at byte {at} does not match its length")
            scans += 1
            pos = _skip_entropy_data(data, pos)


def _check_sof(body, at, frame):
    if frame:
        raise EncodedFileError(f"JPEG corrupt: a second frame header at byte {at}")
    if len(body) < 6:
        raise EncodedFileError(f"JPEG corrupt: frame header at byte {at} is too short")
    _, height, width, components = struct.unpack(">BHHB", body[:6])
    if len(body) != 6 + 3 * components or components not in (1, 3, 4):
        raise EncodedFileError(f"JPEG corrupt: frame header at byte {at} does not match its length")
    if not height or not width:
        raise EncodedFileError(f"JPEG corrupt: frame header at byte {at} gives a size of {width}x{height}")


def _check_dht(body, at):
    i = 0
    while i < len(body):
        if i + 17 > len(body):
            raise EncodedFileError(f"JPEG corrupt: Huffman table at byte {at} is cut short")
        count = sum(body[i + 1:i + 17])
        if body[i] & 0x0F > 3 or body[i] >> 4 > 1 or count > 256 or i + 17 + count > len(body):
            raise EncodedFileError(f"JPEG corrupt: Huffman table at byte {at} is invalid")
        i += 17 + count


def _check_dqt(body, at):
    i = 0
    while i < len(body):
        size = 128 if body[i] >> 4 else 64
        if body[i] >> 4 > 1 or body[i] & 0x0F > 3 or i + 1 + size > len(body):
            raise EncodedFileError(f"JPEG corrupt: quantisation table at byte {at} is invalid")
        i += 1 + size


def _skip_entropy_data(data, pos):
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            raise EncodedFileError(f"JPEG truncated at byte {n}: the scan data has no end-of-image marker (EOI)")
        nxt = data[pos + 1]
        if nxt == 0x00 or nxt in _RST or nxt == 0xFF:
            pos += 1 if nxt == 0xFF else 2
            continue
        return pos


# pylint: enable=duplicate-code
# -- DALI in a child process -------------------------------------------------------------------------------

class DecoderFailed(Exception):
    """DALI refused a batch, or its process died or hung; ``code`` is the Triton error code to answer."""

    def __init__(self, message, code="INVALID_ARG"):
        super().__init__(message)
        self.code = code


class DaliProcess:
    """The serialized pipeline in a child process: ``run(files)`` gives uint8 HWC images, or
    DecoderFailed; after a failure the child is gone and the next ``run`` starts a new one."""

    def __init__(self, config):
        self.config = dict(config, parent_pid=os.getpid())
        self.proc = None

    def start(self):
        python = sys.executable if os.path.basename(sys.executable or "").startswith("python") else "python3"
        self.proc = subprocess.Popen([python, "-c", _BOOT, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd="/", close_fds=True)
        try:
            _write_frame(self.proc.stdin, self.config)
            kind, value = self._receive(STARTUP_TIMEOUT_S)
        except DecoderFailed as exc:
            self.close()
            raise RuntimeError(f"the DALI preprocessing process did not start: {exc}") from exc
        if kind != "ready":
            self.close()
            raise RuntimeError(f"the DALI preprocessing pipeline {self.config['dali_path']} did not build: {value}")

    def run(self, files):
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            try:
                self.start()
            except RuntimeError as exc:
                raise DecoderFailed(str(exc), "INTERNAL") from exc
        try:
            _write_frame(self.proc.stdin, files)
        except OSError:
            pass  # it died: _receive says how
        kind, value = self._receive(RUN_TIMEOUT_S)
        if kind != "ok":
            self.close()  # it exits after an error anyway; never reuse a process whose decoder failed
            raise DecoderFailed(value)
        return value

    def _receive(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        head = _read_exact(fd, 8, deadline)
        body = _read_exact(fd, struct.unpack(">Q", head)[0], deadline) if head is not None else None
        if body is None:
            if time.monotonic() >= deadline:
                self.close()
                raise DecoderFailed(f"the decoder took over {timeout_s:.0f} s and was stopped", "INTERNAL")
            self.proc.wait()
            code = self.proc.returncode
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self.close()
            raise DecoderFailed(f"the decoder process died ({how}) on these images")
        return pickle.loads(body)

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None


def _read_exact(fd, n, deadline):
    """``n`` bytes from ``fd``, or None at end of file or past ``deadline``."""
    chunks, left = [], n
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            return None
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_frame(stream, obj):
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack(">Q", len(body)) + body)
    stream.flush()


def _read_frame(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack(">Q", head)
    body = stream.read(n)
    return pickle.loads(body) if len(body) == n else None


def child_main():
    """The child: build the pipeline, then answer batches until the stub goes; exit after a DALI error."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # native libraries print to stdout: into the server's log, never into the frames
    inp = os.fdopen(0, "rb")
    config = _read_frame(inp)
    if config is None:
        return
    _die_with(config["parent_pid"])
    try:
        from nvidia.dali import Pipeline

        pipe = Pipeline.deserialize(filename=config["dali_path"], batch_size=config["batch_size"],
                                    num_threads=config["num_threads"], device_id=None, prefetch_queue_depth=1)
        pipe.build()
    except Exception as exc:  # noqa: BLE001 - reported to the stub, which fails the model's load
        _write_frame(out, ("error", _short(exc)))
        return
    _write_frame(out, ("ready", None))
    while True:
        files = _read_frame(inp)
        if files is None:
            return  # the stub is gone
        try:
            images = []
            for start in range(0, len(files), config["batch_size"]):
                chunk = [np.frombuffer(f, dtype=np.uint8) for f in files[start:start + config["batch_size"]]]
                pipe.feed_input(config["input_name"], chunk)
                (batch,) = pipe.run()
                images += [np.array(batch.at(i)) for i in range(len(chunk))]
        except Exception as exc:  # noqa: BLE001 - answered, then this process ends (see the module docstring)
            _write_frame(out, ("error", _short(exc)))
            os._exit(0)
        _write_frame(out, ("ok", images))


def _die_with(parent_pid):
    """SIGKILL this process when the stub dies, whatever DALI is doing then (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)  # the stub died before the line above took effect


def _short(exc):
    # DALI errors carry the pipeline's definition traceback; the first and last lines say what failed.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(exc).__name__
