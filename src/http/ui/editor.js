// sdserve's image editor, for the page (index.html): the picture to edit on one
// canvas, a mask painted over it on another (brush, eraser, size, clear), and
// "extend" for outpainting (the canvas grows by EXTEND pixels on one side, the
// new strip filled by stretching the picture's edge and added to the mask).
// What it gives the page to send, as POST /generate takes it:
//   init_image: {"image_id", "index"} for an earlier result left as it was,
//               else the canvas as a PNG data: URL;
//   mask_image: the mask as a PNG data: URL, white = repaint, black = keep
//               (null when nothing is painted: image to image);
//   strength:   null until the slider is moved (the server's default then).
// No build step, no dependencies; served beside index.html as editor.js.
(function () {
  "use strict";

  var EXTEND = 64;             // pixels per "extend" click (a multiple of 8)
  var MASK_RGB = "255, 64, 96"; // how painted areas show (the canvas is half transparent)

  function SdEditor(els, hooks) {
    this.els = els;
    this.hooks = hooks || {};
    this.ref = null;       // {image_id, index} while the picture is that result, unchanged
    this.active = false;
    this.touched = false;  // the strength slider was moved
    this.drawing = null;   // the pointer painting now, and its last point
    this.pic = els.picture.getContext("2d");
    this.mask = els.mask.getContext("2d");
    this.wire();
  }

  SdEditor.prototype.wire = function () {
    var self = this, els = this.els;
    els.mask.addEventListener("pointerdown", function (e) { self.down(e); });
    els.mask.addEventListener("pointermove", function (e) { self.move(e); });
    ["pointerup", "pointercancel", "lostpointercapture"].forEach(function (t) {
      els.mask.addEventListener(t, function () { self.up(); });
    });
    els.clear.addEventListener("click", function () {
      self.mask.clearRect(0, 0, els.mask.width, els.mask.height);
      self.changed();
    });
    els.extend.forEach(function (b) {
      b.addEventListener("click", function () { self.extend(b.getAttribute("data-extend")); });
    });
    els.strength.addEventListener("input", function () { self.touched = true; self.showStrength(); });
    els.stop.addEventListener("click", function () { self.close(); });
  };

  // Opens `src` ({url, ref?, label} or {file}) for editing; resolves once drawn.
  SdEditor.prototype.open = function (src) {
    var self = this;
    return loadImage(src).then(function (img) {
      var els = self.els;
      els.picture.width = els.mask.width = img.naturalWidth;
      els.picture.height = els.mask.height = img.naturalHeight;
      self.pic.drawImage(img, 0, 0);
      self.mask.clearRect(0, 0, els.mask.width, els.mask.height);
      self.ref = src.ref || null;
      self.active = true;
      self.touched = false;
      els.label.textContent = src.label || (src.file ? src.file.name : "");
      els.root.hidden = false;
      self.changed();
      if (self.hooks.opened) self.hooks.opened();
    });
  };

  SdEditor.prototype.close = function () {
    this.active = false;
    this.ref = null;
    this.els.root.hidden = true;
    if (this.hooks.closed) this.hooks.closed();
  };

  // Where the pointer is, in canvas pixels.
  SdEditor.prototype.at = function (e) {
    var c = this.els.mask, r = c.getBoundingClientRect();
    return { x: (e.clientX - r.left) * c.width / r.width, y: (e.clientY - r.top) * c.height / r.height };
  };

  // The brush's width in canvas pixels: the slider is in screen pixels.
  SdEditor.prototype.brushWidth = function () {
    var c = this.els.mask, r = c.getBoundingClientRect();
    return Number(this.els.size.value) * (r.width ? c.width / r.width : 1);
  };

  SdEditor.prototype.down = function (e) {
    if (!this.active || (e.pointerType === "mouse" && e.button !== 0)) return;
    e.preventDefault();
    try { this.els.mask.setPointerCapture(e.pointerId); } catch (err) { /* synthetic pointers */ }
    this.drawing = { id: e.pointerId, last: this.at(e) };
    this.stroke(this.drawing.last, this.drawing.last);
  };

  SdEditor.prototype.move = function (e) {
    if (!this.drawing || e.pointerId !== this.drawing.id) return;
    e.preventDefault();
    var p = this.at(e);
    this.stroke(this.drawing.last, p);
    this.drawing.last = p;
  };

  SdEditor.prototype.up = function () {
    if (!this.drawing) return;
    this.drawing = null;
    this.changed();
  };

  SdEditor.prototype.stroke = function (a, b) {
    var ctx = this.mask;
    var erase = this.els.eraser.checked;
    ctx.save();
    ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "rgb(" + MASK_RGB + ")";
    ctx.lineWidth = this.brushWidth();
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x + 0.01, b.y);
    ctx.stroke();
    ctx.restore();
  };

  // Grows the canvas by EXTEND pixels on `side` (left, right, up, down).
  SdEditor.prototype.extend = function (side) {
    if (!this.active) return;
    var els = this.els, w = els.picture.width, h = els.picture.height, n = EXTEND;
    var wide = side === "left" || side === "right";
    var dx = side === "left" ? n : 0, dy = side === "up" ? n : 0;
    var oldPic = copyOf(els.picture), oldMask = copyOf(els.mask);
    els.picture.width = els.mask.width = w + (wide ? n : 0);
    els.picture.height = els.mask.height = h + (wide ? 0 : n);
    this.pic.drawImage(oldPic, dx, dy);
    this.mask.drawImage(oldMask, dx, dy);
    // The new strip: the edge row or column stretched over it, and masked.
    var strip = {
      left: [0, 0, 1, h, 0, 0, n, h], right: [w - 1, 0, 1, h, w, 0, n, h],
      up: [0, 0, w, 1, 0, 0, w, n], down: [0, h - 1, w, 1, 0, h, w, n]
    }[side];
    this.pic.drawImage(oldPic, strip[0], strip[1], strip[2], strip[3], strip[4], strip[5], strip[6], strip[7]);
    this.mask.fillStyle = "rgb(" + MASK_RGB + ")";
    this.mask.fillRect(strip[4], strip[5], strip[6], strip[7]);
    this.ref = null;
    this.changed();
  };

  SdEditor.prototype.painted = function () {
    var c = this.els.mask;
    if (!c.width || !c.height) return false;
    var d = this.mask.getImageData(0, 0, c.width, c.height).data;
    for (var i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
    return false;
  };

  // diffusers' defaults, as the server applies them: 0.8 for image to image
  // (SDXL 0.3), 1.0 for inpainting (SDXL's 0.9999 shows as 1.00). The page
  // sets `xl` from /info.
  SdEditor.prototype.defaultStrength = function () { return this.painted() ? 1 : (this.xl ? 0.3 : 0.8); };

  SdEditor.prototype.changed = function () {
    var els = this.els;
    if (!this.touched) els.strength.value = String(this.defaultStrength());
    els.size.max = String(Math.max(8, Math.round(Math.max(els.mask.width, els.mask.height) / 2)));
    els.dims.textContent = els.picture.width + " × " + els.picture.height;
    els.mode.textContent = this.painted() ? "Inpainting: the painted area is repainted" :
      "Image to image: paint a mask to repaint only part of it";
    this.showStrength();
  };

  SdEditor.prototype.showStrength = function () {
    var v = Number(this.els.strength.value);
    this.els.strengthValue.textContent = v.toFixed(2) + (this.touched ? "" : " (default)");
  };

  // What to send; throws an Error with a message for the page when the
  // picture can't be read back (an image from storage without CORS).
  SdEditor.prototype.payload = function () {
    var init = this.ref;
    if (!init) {
      try { init = this.els.picture.toDataURL("image/png"); } catch (e) {
        throw new Error("this picture's storage does not let the page read it back (CORS); " +
          "download it and use Upload to edit it");
      }
    }
    return {
      init_image: init,
      mask_image: this.painted() ? maskPng(this.els.mask) : null,
      strength: this.touched ? Number(this.els.strength.value) : null
    };
  };

  function copyOf(canvas) {
    var c = document.createElement("canvas");
    c.width = canvas.width;
    c.height = canvas.height;
    c.getContext("2d").drawImage(canvas, 0, 0);
    return c;
  }

  // White where anything is painted, black elsewhere, as a PNG data: URL.
  function maskPng(canvas) {
    var c = document.createElement("canvas");
    c.width = canvas.width;
    c.height = canvas.height;
    var ctx = c.getContext("2d");
    var src = canvas.getContext("2d").getImageData(0, 0, c.width, c.height);
    var out = ctx.createImageData(c.width, c.height);
    for (var i = 0; i < src.data.length; i += 4) {
      var v = src.data[i + 3] >= 128 ? 255 : 0;
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    return c.toDataURL("image/png");
  }

  // An <img> for {file} or {url}; a URL is asked for with CORS first (so the
  // canvas stays readable), then without (shown, but only sendable by ref).
  function loadImage(src) {
    function load(url, cors) {
      return new Promise(function (resolve, reject) {
        var img = new Image();
        if (cors) img.crossOrigin = "anonymous";
        img.onload = function () { resolve(img); };
        img.onerror = function () { reject(new Error("could not load the picture")); };
        img.src = url;
      });
    }
    if (src.file) {
      var url = URL.createObjectURL(src.file);
      return load(url, false).then(function (img) { URL.revokeObjectURL(url); return img; }, function () {
        URL.revokeObjectURL(url);
        throw new Error("could not read " + src.file.name + " as an image (PNG, JPEG or WebP)");
      });
    }
    var sameOrigin = false;
    try { sameOrigin = new URL(src.url, window.location.href).origin === window.location.origin; } catch (e) { /* keep false */ }
    if (sameOrigin) return load(src.url, false);
    return load(src.url, true).catch(function () { return load(src.url, false); });
  }

  window.SdEditor = SdEditor;
})();
