package compare

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"slices"

	"golang.org/x/image/font"
	"golang.org/x/image/font/gofont/gobold"
	"golang.org/x/image/font/gofont/goregular"
	"golang.org/x/image/font/opentype"
	"golang.org/x/image/math/fixed"
)

// The chart's geometry, in pixels.
const (
	chartWidth  = 1000
	margin      = 16
	labelWidth  = 150 // system names left of the bars
	barHeight   = 18
	rowHeight   = 24
	titleHeight = 30
	barMax      = 520 // the longest bar
	plotHeight  = 160 // (e)'s live-address plot
)

var (
	white     = color.RGBA{255, 255, 255, 255}
	ink       = color.RGBA{30, 30, 30, 255}
	grid      = color.RGBA{200, 200, 200, 255}
	egressdC  = color.RGBA{46, 109, 180, 255}
	directC   = color.RGBA{90, 160, 90, 255}
	othersC   = color.RGBA{150, 150, 150, 255}
	lineColor = color.RGBA{200, 80, 40, 255}
)

// WriteChart draws the results as a PNG: per scenario, a horizontal bar
// per system, its length the ratio to direct (for memory, the KiB per
// tunnel), labelled with the ratio and the absolute figure; and for (e) the
// live address count over time.
func (r *Results) WriteChart(w io.Writer) error {
	c, err := newCanvas(r.chartHeight())
	if err != nil {
		return err
	}
	y := margin
	c.text(margin, y+18, c.bold, "egressd against no proxy, tinyproxy and Squid ("+r.Date.UTC().Format("2006-01-02")+", medians of "+fmt.Sprint(r.Runs)+" runs)")
	y += titleHeight
	for _, sc := range Scenarios {
		sums := r.Summarize(sc)
		if len(sums) == 0 {
			continue
		}
		y = c.bars(y, sc, sums)
	}
	if r.Rotation != nil && len(r.Rotation.Ticks) > 1 {
		c.livePlot(y, r.Rotation)
	}
	return png.Encode(w, c.img)
}

func (r *Results) chartHeight() int {
	h := margin + titleHeight
	for _, sc := range Scenarios {
		if n := len(r.Summarize(sc)); n > 0 {
			h += titleHeight + n*rowHeight + margin
		}
	}
	if r.Rotation != nil && len(r.Rotation.Ticks) > 1 {
		h += titleHeight + plotHeight + 2*margin
	}
	return h + margin
}

type canvas struct {
	img           *image.RGBA
	regular, bold font.Face
}

func newCanvas(height int) (*canvas, error) {
	regular, err := face(goregular.TTF, 13)
	if err != nil {
		return nil, err
	}
	bold, err := face(gobold.TTF, 14)
	if err != nil {
		return nil, err
	}
	img := image.NewRGBA(image.Rect(0, 0, chartWidth, height))
	draw.Draw(img, img.Bounds(), image.NewUniform(white), image.Point{}, draw.Src)
	return &canvas{img: img, regular: regular, bold: bold}, nil
}

func face(ttf []byte, size float64) (font.Face, error) {
	f, err := opentype.Parse(ttf)
	if err != nil {
		return nil, fmt.Errorf("parsing font: %w", err)
	}
	return opentype.NewFace(f, &opentype.FaceOptions{Size: size, DPI: 72, Hinting: font.HintingFull})
}

// text draws s with its baseline at y.
func (c *canvas) text(x, y int, f font.Face, s string) {
	d := font.Drawer{Dst: c.img, Src: image.NewUniform(ink), Face: f, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func (c *canvas) rect(x0, y0, x1, y1 int, col color.Color) {
	draw.Draw(c.img, image.Rect(x0, y0, x1, y1), image.NewUniform(col), image.Point{}, draw.Src)
}

// bars draws one scenario's panel from y down and returns the y below it.
func (c *canvas) bars(y int, sc Scenario, sums []Summary) int {
	length := func(s Summary) float64 { return s.Ratio }
	title := fmt.Sprintf("(%s) %s: %s, ratio to direct", sc.ID, sc.Title, sc.Unit)
	if sc == Idle {
		length = func(s Summary) float64 { return s.Value }
		title = fmt.Sprintf("(%s) %s (lower is better)", sc.ID, sc.Title)
	}
	c.text(margin, y+18, c.bold, title)
	y += titleHeight
	longest := 1.0
	for _, s := range sums {
		longest = max(longest, length(s))
	}
	x0 := margin + labelWidth
	if sc != Idle {
		// A line at 1.0, the direct figure.
		x1 := x0 + int(barMax/longest)
		c.rect(x1, y-4, x1+1, y+len(sums)*rowHeight, grid)
	}
	for _, s := range sums {
		c.text(margin, y+14, c.regular, s.System)
		n := int(barMax * length(s) / longest)
		c.rect(x0, y, x0+n, y+barHeight, barColor(s.System))
		label := fmt.Sprintf("%s %s", num(s.Value), sc.Unit)
		if sc != Idle {
			label = ratio(s.Ratio) + "  " + label
		}
		if s.Errors > 0 {
			label += fmt.Sprintf("  (%d errors)", s.Errors)
		}
		c.text(x0+n+6, y+14, c.regular, label)
		y += rowHeight
	}
	return y + margin
}

func barColor(system string) color.Color {
	switch {
	case system == Direct:
		return directC
	case slices.Contains(egressdSystems, system):
		return egressdC
	}
	return othersC
}

// livePlot draws (e)'s live address count over time from y down.
func (c *canvas) livePlot(y int, r *Rotation) {
	s := r.Summary()
	c.text(margin, y+18, c.bold, fmt.Sprintf("(e) live addresses at %.0f new connections/s, on-link -rotate request (max %d, median %d)", r.Rate, s.LiveMax, s.LiveMedian))
	y += titleHeight
	x0, x1 := margin+labelWidth, chartWidth-margin
	y0, y1 := y+plotHeight, y // bottom and top
	c.rect(x0, y0, x1, y0+1, grid)
	c.rect(x0, y1, x0+1, y0, grid)
	top := float64(max(s.LiveMax, 1))
	c.text(margin, y1+12, c.regular, fmt.Sprint(s.LiveMax))
	c.text(margin, y0, c.regular, "0")
	c.text(x1-60, y0+16, c.regular, fmt.Sprintf("%.0f s", r.Ticks[len(r.Ticks)-1].T))
	span := max(r.Ticks[len(r.Ticks)-1].T, 1)
	px := func(t Tick) (int, int) {
		return x0 + int(float64(x1-x0)*t.T/span), y0 - int(float64(plotHeight)*float64(t.Live)/top)
	}
	for i := 1; i < len(r.Ticks); i++ {
		ax, ay := px(r.Ticks[i-1])
		bx, by := px(r.Ticks[i])
		c.line(ax, ay, bx, by, lineColor)
	}
}

// line draws a two-pixel-wide line from (ax, ay) to (bx, by).
func (c *canvas) line(ax, ay, bx, by int, col color.RGBA) {
	steps := max(abs(bx-ax), abs(by-ay), 1)
	for i := 0; i <= steps; i++ {
		x := ax + (bx-ax)*i/steps
		y := ay + (by-ay)*i/steps
		c.img.SetRGBA(x, y, col)
		c.img.SetRGBA(x, y+1, col)
	}
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}
